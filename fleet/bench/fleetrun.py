"""A private fleet for one benchmark configuration: Redis, S3, N workers and the API on
free ports, started fresh and stopped after, so configurations never share state."""

from __future__ import annotations

import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fleet.processes import free_port
from fleet.stack import RedisServer, s3_env, start_api, start_s3, start_worker


@dataclass(frozen=True)
class FleetConfig:
    max_batch_images: int = 8
    max_wait_ms: float = 0
    policy: str = "fixed"
    workers: int = 1
    engine: str = "process"  # or "thread": the model on a thread of the worker process
    compile: str = "off"
    warm: str = ""  # FLEET_WARM_SHAPES; empty: the bench size at max_batch_images

    @property
    def label(self) -> str:
        wait = "adaptive" if self.policy == "adaptive" else f"wait {self.max_wait_ms:g} ms"
        workers = f", {self.workers} workers" if self.workers > 1 else ""
        engine = ", model thread" if self.engine == "thread" else ""
        compiled = f", compiled ({self.compile})" if self.compile != "off" else ""
        return f"batch {self.max_batch_images}, {wait}{workers}{engine}{compiled}"

    def env(self) -> dict[str, str]:
        env = {
            "FLEET_MAX_BATCH_IMAGES": str(self.max_batch_images),
            "FLEET_MAX_WAIT_MS": str(self.max_wait_ms),
            "FLEET_BATCH_POLICY": self.policy,
            "FLEET_ENGINE": self.engine,
            "FLEET_COMPILE": self.compile,
        }
        if self.warm:
            env["FLEET_WARM_SHAPES"] = self.warm
        return env

    @classmethod
    def parse(cls, text: str) -> FleetConfig:
        """``8:50:fixed``, ``8:200:adaptive:4`` or ``8:0:fixed:1:thread`` (max batch, max wait
        ms, policy, workers, engine)."""
        parts = text.split(":")
        return cls(int(parts[0]), float(parts[1]), parts[2] if len(parts) > 2 else "fixed",
                   int(parts[3]) if len(parts) > 3 else 1, parts[4] if len(parts) > 4 else "process")  # fmt: skip


@dataclass
class RunningFleet:
    api_url: str
    worker_start_s: float  # from launch until the first worker answers: load, warm, compile
    env: dict[str, str]  # what its processes run with (to start another worker)
    work_dir: Path
    pids: dict[str, int]  # "api" (gunicorn's arbiter: its workers are its children), "redis"


@contextmanager
def running_fleet(model: str, config: FleetConfig, work_dir: Path, default_size: int = 64, **extra_env: str):
    work_dir.mkdir(parents=True, exist_ok=True)
    redis_server = RedisServer(work_dir).start()
    storage = s3_env(work_dir)
    s3 = start_s3(work_dir, storage)
    env = {
        **storage,
        **config.env(),
        "FLEET_REDIS_URL": redis_server.url,
        "FLEET_MODEL": model,
        "FLEET_API_PORT": str(free_port()),
        "FLEET_WORKER_METRICS_PORT": "0",
        "FLEET_DEFAULT_WIDTH": str(default_size),
        "FLEET_DEFAULT_HEIGHT": str(default_size),
        **extra_env,
    }
    processes = []
    try:
        started = time.perf_counter()
        for index in range(config.workers):
            name = f"bench{index}-{free_port()}"
            processes.append(start_worker(env, work_dir, name, timeout_s=1800 if config.compile != "off" else 180))
        worker_start_s = time.perf_counter() - started
        api, api_url = start_api(env, work_dir, workers=2)
        processes.append(api)
        pids = {"api": api.pid, "redis": redis_server.server.pid if redis_server.server else 0}
        yield RunningFleet(api_url, worker_start_s, env, work_dir, pids)
    except BaseException:
        for log in sorted(work_dir.glob("*.log")):
            print(f"--- last lines of {log.name} ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:]))
        raise
    finally:
        for process in reversed(processes):
            process.stop()
        s3.stop()
        redis_server.stop()
        keep_logs(work_dir, config)


def keep_logs(work_dir: Path, config: FleetConfig) -> None:
    """``FLEET_BENCH_LOGS=DIR`` keeps every fleet's process logs (engine start, warm-up and
    compile times are in the worker's)."""
    target = os.environ.get("FLEET_BENCH_LOGS")
    if not target:
        return
    stem = re.sub(r"[^a-z0-9]+", "-", config.label.lower()).strip("-") + time.strftime("-%H%M%S")
    Path(target).mkdir(parents=True, exist_ok=True)
    for log in work_dir.glob("*.log"):
        shutil.copy(log, Path(target) / f"{stem}-{log.name}")
