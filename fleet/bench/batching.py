"""Batching benchmark: the bare pipeline at batch 1 and 8, and the running fleet on the
same burst with ``max_batch_images`` 8 and 1, all in one run on one machine.

    fleet bench batching --size 128 --steps 20 --jobs 96

Prints a Markdown table and writes the raw figures as JSON.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from fleet.bench.bare import BareRow, time_bare
from fleet.bench.burst import BurstResult, run_burst
from fleet.processes import free_port
from fleet.stack import s3_env, start_api, start_redis, start_s3, start_worker


@dataclass(frozen=True)
class FleetConfig:
    label: str
    max_batch_images: int
    max_wait_ms: float
    policy: str

    def env(self) -> dict[str, str]:
        return {
            "FLEET_MAX_BATCH_IMAGES": str(self.max_batch_images),
            "FLEET_MAX_WAIT_MS": str(self.max_wait_ms),
            "FLEET_BATCH_POLICY": self.policy,
        }


DEFAULT_CONFIGS = (
    FleetConfig("fleet, max batch 8, adaptive", 8, 100, "adaptive"),
    FleetConfig("fleet, max batch 8, fixed 100 ms", 8, 100, "fixed"),
    FleetConfig("fleet, max batch 1", 1, 0, "fixed"),
)


def measure_bare(model_dir: str, size: int, steps: int, device: str, calls: dict[int, int]) -> dict[int, BareRow]:
    from workers.pipeline import DiffusersModel
    from workers.work import CompatKey

    model = DiffusersModel.load(model_dir, device)
    key = CompatKey(model.name, size, size, steps, 7.5)
    return {batch: time_bare(model, key, batch, n) for batch, n in calls.items()}


def measure_fleet(
    model_dir: str, size: int, steps: int, jobs: int, configs: tuple[FleetConfig, ...], work_dir: Path
) -> dict[str, BurstResult]:
    redis_server, redis_url = start_redis(work_dir)
    storage_env = s3_env(work_dir)
    s3 = start_s3(work_dir, storage_env)
    results = {}
    try:
        for config in configs:
            env = {
                **storage_env,
                **config.env(),
                "FLEET_REDIS_URL": redis_url,
                "FLEET_MODEL": model_dir,
                "FLEET_QUEUE": f"bench-{free_port()}",
                "FLEET_API_PORT": str(free_port()),
                "FLEET_WORKER_METRICS_PORT": "0",
                "FLEET_DEFAULT_WIDTH": str(size),
                "FLEET_DEFAULT_HEIGHT": str(size),
            }
            worker = start_worker(env, work_dir, f"bench-{config.max_batch_images}")
            api, api_url = start_api(env, work_dir)
            try:
                bodies = [{"prompt": f"bench {i}", "seed": i, "steps": steps} for i in range(jobs)]
                results[config.label] = run_burst(api_url, redis_url, bodies)
            finally:
                api.stop()
                worker.stop()
    finally:
        s3.stop()
        redis_server.stop()
    return results


def report(size: int, steps: int, bare: dict[int, BareRow], fleet: dict[str, BurstResult]) -> str:
    b1, b8 = bare[1].images_per_s, bare[8].images_per_s
    lines = [
        f"#### {size}x{size}, {steps} steps",
        "",
        "| configuration | images | images/s | vs bare batch 8 | batch sizes (size: calls) "
        "| mean batch wait | mean upload |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch, row in bare.items():
        lines.append(
            f"| bare pipeline, batch {batch} | {row.images} | {row.images_per_s:.2f} | {row.images_per_s / b8:.2f} "
            f"| {batch}: {row.images // batch} | – | – |"
        )
    for label, result in fleet.items():
        sizes = ", ".join(f"{k}: {v}" for k, v in result.batch_sizes.items())
        lines.append(
            f"| {label} | {result.images} | {result.images_per_s:.2f} | {result.images_per_s / b8:.2f} | {sizes} "
            f"| {result.mean('batch_wait_s') * 1000:.0f} ms | {result.mean('upload_s') * 1000:.0f} ms |"
        )
    fleet8 = next((r for label, r in fleet.items() if "max batch 8" in label), None)
    fleet1 = next((r for label, r in fleet.items() if "max batch 1" in label), None)
    lines += ["", f"- bare batching gain (8 vs 1): **{b8 / b1:.2f}x**"]
    if fleet8 and fleet1:
        gain = fleet8.images_per_s / fleet1.images_per_s
        lines += [
            f"- fleet batching gain (max 8 vs max 1, first config): **{gain:.2f}x** = "
            f"**{gain / (b8 / b1):.2f}** of the bare gain (target ≥ 0.9)",
            f"- fleet max 8 / bare batch 8: **{fleet8.images_per_s / b8:.2f}** (target ≥ 0.95)",
        ]
    failed = sum(r.failed for r in fleet.values())
    lines.append(f"- failed jobs: {failed}")
    return "\n".join(lines)


def run(size: int, steps: int, jobs: int, model_dir: str, device: str, out: Path | None) -> str:
    bare = measure_bare(model_dir, size, steps, device, {1: max(16, jobs // 3), 8: max(6, jobs // 8)})
    with tempfile.TemporaryDirectory() as tmp:
        fleet = measure_fleet(model_dir, size, steps, jobs, DEFAULT_CONFIGS, Path(tmp))
    text = report(size, steps, bare, fleet)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        raw = {
            "size": size,
            "steps": steps,
            "bare": {b: asdict(r) | {"images_per_s": r.images_per_s} for b, r in bare.items()},
            "fleet": {
                label: {
                    "images": r.images,
                    "images_per_s": r.images_per_s,
                    "span_s": r.span_s,
                    "batch_sizes": r.batch_sizes,
                    "failed": r.failed,
                    "mean_batch_wait_s": r.mean("batch_wait_s"),
                    "mean_inference_s": r.mean("inference_s"),
                    "mean_upload_s": r.mean("upload_s"),
                    "mean_queue_wait_s": r.mean("queue_wait_s"),
                }
                for label, r in fleet.items()
            },
        }
        out.write_text(json.dumps(raw, indent=2))
    return text
