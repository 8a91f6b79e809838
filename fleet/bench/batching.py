"""Batching benchmark: the bare pipeline at batch 1 and 8, and the running fleet at
saturation with ``max_batch_images`` 8 and 1, all in one run on one machine.

    fleet bench batching --size 128 --steps 20 --jobs 96

Prints a Markdown table and writes the raw figures as JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from fleet.bench.bare import BareRow, measure_bare
from fleet.bench.fleetrun import FleetConfig
from fleet.bench.mix import RequestMix, RequestShape
from fleet.bench.sweep import Point, run_sweep

CONFIGS = (
    FleetConfig(8, 0, "fixed"),
    FleetConfig(8, 100, "adaptive"),
    FleetConfig(1, 0, "fixed"),
)


def uniform_mix(size: int, steps: int) -> RequestMix:
    return RequestMix(f"{size}px", (RequestShape(1, size, size, steps),))


def report(size: int, steps: int, bare: dict[int, BareRow], fleet: list[Point]) -> str:
    b1, b8 = bare[1].images_per_s, bare[8].images_per_s
    lines = [
        f"#### {size}x{size}, {steps} steps",
        "",
        "| configuration | images | images/s | vs bare, same max batch | batch sizes (images: calls) "
        "| mean inference per call |",
        "|---|---|---|---|---|---|",
    ]
    for batch, row in bare.items():
        lines.append(
            f"| bare pipeline, batch {batch} | {row.images} | {row.images_per_s:.2f} | 1.00 "
            f"| {batch}: {row.images // batch} | {row.per_call_s * 1000:.0f} ms |"
        )
    for point in fleet:
        s, limit = point.summary, point.config.max_batch_images
        sizes = ", ".join(f"{k}: {v}" for k, v in s.batch_sizes.items())
        lines.append(
            f"| fleet, {point.config.label} | {s.images} | {s.images_per_s:.2f} "
            f"| {s.images_per_s / bare[limit].images_per_s:.2f} | {sizes} "
            f"| {s.phases['inference']['mean'] * 1000:.0f} ms |"
        )
    by_batch = {p.config.max_batch_images: p.summary.images_per_s for p in fleet if p.config.policy == "fixed"}
    lines += ["", f"- bare batching gain (8 vs 1): **{b8 / b1:.2f}x**"]
    if 8 in by_batch and 1 in by_batch:
        gain = by_batch[8] / by_batch[1]
        lines += [
            f"- fleet batching gain (max 8 vs max 1): **{gain:.2f}x** = **{gain / (b8 / b1):.2f}** of the bare gain"
            " (target ≥ 0.9)",
            f"- fleet max 8 / bare batch 8: **{by_batch[8] / b8:.2f}** (target ≥ 0.95)",
        ]
    return "\n".join(lines)


def run(size: int, steps: int, jobs: int, model_dir: str, device: str, out: Path | None) -> str:
    bare = measure_bare(model_dir, size, steps, device, {1: max(16, jobs // 3), 8: max(6, jobs // 8)})
    loads = []
    fleet = run_sweep(model_dir, list(CONFIGS), loads, uniform_mix(size, steps), saturation_jobs=jobs)
    text = report(size, steps, bare, fleet)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        raw = {
            "size": size,
            "steps": steps,
            "bare": {b: asdict(r) | {"images_per_s": r.images_per_s} for b, r in bare.items()},
            "fleet": [p.to_dict() for p in fleet],
        }
        out.write_text(json.dumps(raw, indent=2))
    return text
