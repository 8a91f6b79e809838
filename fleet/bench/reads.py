"""What one status read costs: the CPU seconds the API, Redis and the client spend on each
``GET /v1/jobs/<id>``, measured on a private fleet.

    fleet bench reads --reads 2000 --out docs/bench/reads.json

A client that polls spends that on every read, on the machine the model runs on. The job
is read ``reads`` times in a row from one client thread, so the reads are all the API has
to do: QUEUED (its place in line costs two Redis reads more), SUCCEEDED with 1 and 4
images (each read signs a download URL per image), and SUCCEEDED again with
``Prefer: wait=60``, which a finished job answers at once. CPU is read from ``/proc``
(Linux) before and after each series, less what the API's processes use idle over the
same time (measured first). The worker is stopped before the SUCCEEDED series: it would
share the cores, and a finished job needs none.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from fleet.bench.cputime import cpu_s, tree_cpu_s
from fleet.bench.fleetrun import FleetConfig, running_fleet
from fleet.client import FleetClient
from fleet.processes import free_port
from fleet.stack import start_worker
from tasks.settings import ClientSettings

#: A model that sleeps: the worker only has to finish two jobs, and loads no torch.
DEFAULT_MODEL = "sim:a=0.01,b=0.05"
IDLE_S = 3.0
#: Jobs in flight at saturation in ``fleet bench batching --closed-loop`` (4 x max batch 8).
IN_FLIGHT = 32


@dataclass(frozen=True)
class ReadCost:
    what: str
    reads: int
    wall_s: float
    api_cpu_s: float  # gunicorn's arbiter and workers, less their idle use
    redis_cpu_s: float
    client_cpu_s: float  # this process: requests, JSON, the JobView

    def per_read_ms(self, cpu_s: float) -> float:
        return cpu_s / self.reads * 1000

    def to_dict(self) -> dict:
        per_read = {
            "api_cpu_ms_per_read": self.per_read_ms(self.api_cpu_s),
            "redis_cpu_ms_per_read": self.per_read_ms(self.redis_cpu_s),
            "client_cpu_ms_per_read": self.per_read_ms(self.client_cpu_s),
            "wall_ms_per_read": self.per_read_ms(self.wall_s),
        }
        return asdict(self) | per_read


def measure(
    what: str, read: Callable[[], object], reads: int, pids: dict[str, int], idle: dict[str, float]
) -> ReadCost:
    """``reads`` reads in a row, after one that warms the connection."""
    read()
    api, redis, client, started = (
        tree_cpu_s(pids["api"]),
        cpu_s(pids["redis"]),
        time.process_time(),
        time.monotonic(),
    )
    for _ in range(reads):
        read()
    wall = time.monotonic() - started
    return ReadCost(
        what,
        reads,
        wall,
        api_cpu_s=tree_cpu_s(pids["api"]) - api - idle["api"] * wall,
        redis_cpu_s=cpu_s(pids["redis"]) - redis - idle["redis"] * wall,
        client_cpu_s=time.process_time() - client,
    )


def idle_rates(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """CPU seconds per second the API and Redis use with nothing to do."""
    before = {"api": tree_cpu_s(pids["api"]), "redis": cpu_s(pids["redis"])}
    time.sleep(seconds)
    return {
        "api": (tree_cpu_s(pids["api"]) - before["api"]) / seconds,
        "redis": (cpu_s(pids["redis"]) - before["redis"]) / seconds,
    }


def run(reads: int, model: str = DEFAULT_MODEL, out: Path | None = None) -> str:
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_fleet(model, FleetConfig(workers=0), Path(tmp)) as fleet,
        FleetClient(fleet.api_url, ClientSettings().api_key or None) as client,
    ):
        idle = idle_rates(fleet.pids, IDLE_S)
        queued = client.submit("a status read", num_images=1)
        rows = [measure("QUEUED job", lambda: client.get(queued.id), reads, fleet.pids, idle)]
        worker = start_worker(fleet.env, fleet.work_dir, f"reads-{free_port()}")
        try:
            one = client.submit("one image", num_images=1, wait_s=60)
            four = client.submit("four images", num_images=4, wait_s=60)
        finally:
            worker.stop()
        if not (one.state.terminal and four.state.terminal):
            raise RuntimeError(f"the jobs did not finish: {one.state.value}, {four.state.value}")
        rows += [
            measure("SUCCEEDED job, 1 image", lambda: client.get(one.id), reads, fleet.pids, idle),
            measure("SUCCEEDED job, 4 images", lambda: client.get(four.id), reads, fleet.pids, idle),
            measure(
                "SUCCEEDED job, 1 image, Prefer: wait=60",
                lambda: client.get(one.id, wait_s=60),
                reads,
                fleet.pids,
                idle,
            ),
        ]
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"idle_cpu_s_per_s": idle, "rows": [r.to_dict() for r in rows]}, indent=2))
        out.with_suffix(".md").write_text(report(rows, idle) + "\n")
    return report(rows, idle)


def report(rows: list[ReadCost], idle: dict[str, float]) -> str:
    lines = [
        "| status read | reads | API CPU per read | Redis CPU per read | client CPU per read | wall per read |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.what} | {r.reads} | {r.per_read_ms(r.api_cpu_s):.2f} ms | {r.per_read_ms(r.redis_cpu_s):.3f} ms "
            f"| {r.per_read_ms(r.client_cpu_s):.2f} ms | {r.per_read_ms(r.wall_s):.2f} ms |"
        )
    queued = rows[0]
    server_ms = queued.per_read_ms(queued.api_cpu_s + queued.redis_cpu_s)
    total_ms = server_ms + queued.per_read_ms(queued.client_cpu_s)
    lines += [
        "",
        f"Idle, the API used {idle['api'] * 1000:.1f} ms of CPU a second and Redis {idle['redis'] * 1000:.1f} ms.",
    ]
    for interval in (0.025, 0.5):
        rate = IN_FLIGHT / interval
        lines.append(
            f"- {IN_FLIGHT} queued jobs polled every {interval * 1000:g} ms ask for {rate:g} reads/s: "
            f"{rate * server_ms / 1000:.2f} cores for the API and Redis, {rate * total_ms / 1000:.2f} with the client"
        )
    return "\n".join(lines)
