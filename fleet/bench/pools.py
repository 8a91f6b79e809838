"""``fleet bench pools``: two models on a fleet, served by a pool each or by one pool that
swaps (docs/BENCHMARKS.md, section 12).

The models are simulated GPUs (``workers.sim``): each call sleeps as a GPU's would and a
load takes ``load_s`` seconds, so two pools are two devices even on a 2-core machine, and a
swap costs what the profile says. Each configuration is a private fleet (Redis, S3, the
API, its workers) driven by the same seeded load of jobs for the two models, half each:

- **two pools**: a worker per model (``FLEET_SERVE=a`` and ``FLEET_SERVE=b``);
- **one pool, both loaded**: one worker serving both with no memory budget;
- **one pool, room for one**: one worker whose budget holds one model, so it swaps, when
  the batcher lets it (``workers.batcher``, ``SWAP_PATIENCE``);
- **one model**: one worker and every job for one model, the baseline of the closed-loop
  (saturation) comparison.

The open-loop rows send Poisson arrivals at ``rate`` jobs/s; the closed-loop rows keep
``concurrency`` jobs in flight, which saturates the worker: its images/s is its capacity.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.bench.fleetrun import FleetConfig, running_fleet
from fleet.bench.load import LoadSpec, run_load
from fleet.bench.mix import RequestMix, RequestShape
from fleet.bench.results import summarize
from fleet.stack import start_worker

#: a launch-light GPU-like call (batch of 8: 0.24 s) whose model takes 1 s to load
MODEL = "sim:a=0.02,b=0.08,load_s=1,mem=100"
SIDE = 64


@dataclass(frozen=True)
class Pools:
    label: str
    serves: tuple[str, ...]  # FLEET_SERVE of each worker
    memory_mb: int = 0
    models: tuple[str, ...] = ("a", "b")  # what the jobs ask for, evenly


CONFIGS = (
    Pools("two pools (a worker per model)", ("a", "b")),
    Pools("one pool, both models loaded", ("a,b",)),
    Pools("one pool, room for one model (swaps)", ("a,b",), memory_mb=150),
)
BASELINE = Pools("one model on one worker", ("a",), models=("a",))


def mix(models: tuple[str, ...]) -> RequestMix:
    return RequestMix(
        "+".join(models), tuple(RequestShape(1.0, SIDE, SIDE, 20, model=model, prompt_words=(3, 8)) for model in models)
    )


@contextmanager
def fleet(pools: Pools, work_dir: Path) -> Iterator[str]:
    registry = work_dir / "models.toml"
    work_dir.mkdir(parents=True, exist_ok=True)
    registry.write_text("".join(f'[models.{name}]\npath = "{MODEL}"\n\n' for name in ("a", "b")))
    extra = {"FLEET_MODELS_FILE": str(registry), "FLEET_MODEL_MEMORY_MB": str(pools.memory_mb)}
    with running_fleet(MODEL, FleetConfig(8, 0, "fixed", workers=0), work_dir, SIDE, **extra) as running:
        workers = [
            start_worker({**running.env, "FLEET_SERVE": serve}, work_dir, f"pool{i}-{serve.replace(',', '-')}")
            for i, serve in enumerate(pools.serves)
        ]
        try:
            yield running.api_url
        finally:
            for worker in workers:
                worker.stop()


def swaps(work_dir: Path) -> int:
    """Models loaded after the engines' first: the runner logs each Swapped as ``batch B:
    model X loaded in`` (the engine's own line for every load, the first too, differs)."""
    pattern = re.compile(r"batch \S+: model \S+ loaded in")
    return sum(len(pattern.findall(log.read_text(errors="replace"))) for log in work_dir.glob("pool*.log"))


def measure(pools: Pools, spec: LoadSpec) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        with fleet(pools, Path(tmp)) as api:
            summary = summarize(run_load(api, mix(pools.models), spec))
        return {
            "config": pools.label,
            "load": spec.label,
            "images_per_s": summary.images_per_s,
            "p50_s": summary.p("end_to_end", 50),
            "p95_s": summary.p("end_to_end", 95),
            "mean_batch": summary.mean_batch,
            "jobs": f"{summary.jobs_succeeded}/{summary.jobs_sent}",
            "swaps": swaps(Path(tmp)),
        }


def run(rate: float, jobs: int, concurrency: int) -> dict[str, Any]:
    open_loop = LoadSpec(rate=rate, jobs=jobs, duration_s=jobs / rate * 3)
    closed = LoadSpec(concurrency=concurrency, jobs=jobs)
    rows = [measure(pools, open_loop) for pools in CONFIGS]
    saturation = [measure(BASELINE, closed), measure(CONFIGS[1], closed), measure(CONFIGS[2], closed)]
    return {"model": MODEL, "open_loop": rows, "saturation": saturation}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Simulated GPU `{result['model']}`, jobs of one 64x64 image, half for each model.",
        "",
        "| load | configuration | images/s | p50 | p95 | mean batch | swaps | jobs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in [*result["open_loop"], *result["saturation"]]:
        lines.append(
            f"| {row['load']} | {row['config']} | {row['images_per_s']:.1f} | {row['p50_s'] * 1000:.0f} ms | "
            f"{row['p95_s'] * 1000:.0f} ms | {row['mean_batch']:.1f} | {row['swaps']} | {row['jobs']} |"
        )
    base, both, swapping = (row["images_per_s"] for row in result["saturation"])
    lines += [
        "",
        f"At saturation, two models alternating on one worker with both loaded: **{both / base:.2f}x** the "
        f"one-model images/s; with room for one (swapping): **{swapping / base:.2f}x**.",
    ]
    return "\n".join(lines)
