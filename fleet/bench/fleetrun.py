"""A private fleet for one benchmark configuration: Redis, S3, N workers and the API on
free ports, started fresh and stopped after, so configurations never share state."""

from __future__ import annotations

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

    @property
    def label(self) -> str:
        wait = "adaptive" if self.policy == "adaptive" else f"wait {self.max_wait_ms:g} ms"
        workers = f", {self.workers} workers" if self.workers > 1 else ""
        return f"batch {self.max_batch_images}, {wait}{workers}"

    def env(self) -> dict[str, str]:
        return {
            "FLEET_MAX_BATCH_IMAGES": str(self.max_batch_images),
            "FLEET_MAX_WAIT_MS": str(self.max_wait_ms),
            "FLEET_BATCH_POLICY": self.policy,
        }

    @classmethod
    def parse(cls, text: str) -> FleetConfig:
        """``8:50:fixed`` or ``8:200:adaptive:4`` (max batch, max wait ms, policy, workers)."""
        parts = text.split(":")
        return cls(int(parts[0]), float(parts[1]), parts[2] if len(parts) > 2 else "fixed",
                   int(parts[3]) if len(parts) > 3 else 1)  # fmt: skip


@dataclass
class RunningFleet:
    api_url: str
    redis_url: str


@contextmanager
def running_fleet(model: str, config: FleetConfig, work_dir: Path, default_size: int = 64):
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
    }
    processes = []
    try:
        for index in range(config.workers):
            processes.append(start_worker(env, work_dir, f"bench{index}-{free_port()}"))
        api, api_url = start_api(env, work_dir, workers=2)
        processes.append(api)
        yield RunningFleet(api_url, redis_server.url)
    finally:
        for process in reversed(processes):
            process.stop()
        s3.stop()
        redis_server.stop()
