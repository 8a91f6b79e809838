"""Batching benchmark: the running fleet on a burst of jobs with ``max_batch_images`` 8 and
1, each timed between two runs of the bare pipeline at the same batch size, all in one run
on one machine (whose speed drifts by 10-30% over minutes: the pairing cancels it).

    fleet bench batching --size 128 --steps 20 --jobs 96

Prints a Markdown table and writes the raw figures as JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from fleet.bench.bare import BareRow, time_bare
from fleet.bench.fleetrun import FleetConfig
from fleet.bench.mix import RequestMix, RequestShape
from fleet.bench.sweep import Point, run_sweep
from workers.work import CompatKey

CONFIGS = (
    FleetConfig(8, 0, "fixed"),
    FleetConfig(8, 100, "adaptive"),
    FleetConfig(1, 0, "fixed"),
)


def uniform_mix(size: int, steps: int) -> RequestMix:
    return RequestMix(f"{size}px", (RequestShape(1, size, size, steps),))


@dataclass
class Pair:
    """A fleet configuration at saturation and the bare pipeline at its max batch size,
    timed right before and right after it: the machine's drift cancels out of the ratio."""

    point: Point
    bare_before: BareRow
    bare_after: BareRow

    @property
    def bare_images_per_s(self) -> float:
        return (self.bare_before.images_per_s + self.bare_after.images_per_s) / 2

    @property
    def ratio(self) -> float:
        return self.point.summary.images_per_s / self.bare_images_per_s


def report(size: int, steps: int, pairs: list[Pair]) -> str:
    lines = [
        f"#### {size}x{size}, {steps} steps",
        "",
        "| fleet configuration | fleet images/s | bare images/s, same batch (before / after) | fleet / bare "
        "| batch sizes (images: calls) | model call, fleet vs bare |",
        "|---|---|---|---|---|---|",
    ]
    for pair in pairs:
        s, limit = pair.point.summary, pair.point.config.max_batch_images
        sizes = ", ".join(f"{k}: {v}" for k, v in s.batch_sizes.items())
        bare_call = (pair.bare_before.per_call_s + pair.bare_after.per_call_s) / 2
        lines.append(
            f"| {pair.point.config.label} | {s.images_per_s:.2f} | {pair.bare_images_per_s:.2f} "
            f"({pair.bare_before.images_per_s:.2f} / {pair.bare_after.images_per_s:.2f}) | **{pair.ratio:.2f}** "
            f"| {sizes} | {s.phases['inference']['mean'] * 1000:.0f} ms vs {bare_call * 1000:.0f} ms (batch {limit}) |"
        )
    fixed = {p.point.config.max_batch_images: p for p in pairs if p.point.config.policy == "fixed"}
    if 8 in fixed and 1 in fixed:
        bare_gain = fixed[8].bare_images_per_s / fixed[1].bare_images_per_s
        fleet_gain = fixed[8].point.summary.images_per_s / fixed[1].point.summary.images_per_s
        lines += [
            "",
            f"- bare batching gain (8 vs 1): **{bare_gain:.2f}x**; fleet batching gain (max 8 vs max 1): "
            f"**{fleet_gain:.2f}x** = **{fleet_gain / bare_gain:.2f}** of the bare gain (target ≥ 0.9)",
            f"- fleet max 8 / bare batch 8: **{fixed[8].ratio:.2f}** (target ≥ 0.95)",
        ]
    return "\n".join(lines)


def run(size: int, steps: int, jobs: int, model_ref: str, device: str, out: Path | None, burst: bool = True) -> str:
    """``burst``: all jobs sent at once (the issue's "same burst"); else a closed loop that
    keeps submitting while batches run."""
    from workers.backends import load_model

    model = load_model(model_ref, device)
    key = CompatKey(model.name, size, size, steps, 7.5)
    pairs = []
    for config in CONFIGS:
        calls = max(6, jobs // (2 * config.max_batch_images)) if config.max_batch_images > 1 else max(12, jobs // 4)
        before = time_bare(model, key, config.max_batch_images, calls)
        (point,) = run_sweep(model_ref, [config], [], uniform_mix(size, steps), saturation_jobs=jobs, burst=burst)
        after = time_bare(model, key, config.max_batch_images, calls)
        pairs.append(Pair(point, before, after))
    text = report(size, steps, pairs)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        raw = {
            "size": size,
            "steps": steps,
            "pairs": [
                {
                    "fleet": p.point.to_dict(),
                    "bare_before": asdict(p.bare_before) | {"images_per_s": p.bare_before.images_per_s},
                    "bare_after": asdict(p.bare_after) | {"images_per_s": p.bare_after.images_per_s},
                    "ratio": p.ratio,
                }
                for p in pairs
            ],
        }
        out.write_text(json.dumps(raw, indent=2))
    return text
