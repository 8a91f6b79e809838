"""Batching benchmark: the running fleet on a burst of jobs with ``max_batch_images`` 8 and
1, each timed between two runs of the bare pipeline at the same batch size, all in one run
on one machine (whose speed drifts by 10-30% over minutes: the pairing cancels it).

    fleet bench batching --size 128 --steps 20 --jobs 96
    fleet bench batching --size 512 --jobs 64 --model sd15 --closed-loop --compile reduce-overhead

With ``--compile`` it also runs a compiled fleet (batch 8, warmed at batch 1 and 8) against
the eager bare pipeline: images/s at saturation, a lone job's end-to-end p50 against the
eager batch-1 call, and the worker's start with an empty compile cache against a second
start that finds it filled.

Prints a Markdown table and writes the raw figures as JSON, after every stage, so a run
cut short still leaves what it measured.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from fleet.bench.bare import BareRow, time_bare
from fleet.bench.fleetrun import FleetConfig, running_fleet
from fleet.bench.follow import Follow
from fleet.bench.load import LoadSpec, run_load
from fleet.bench.mix import RequestMix, RequestShape
from fleet.bench.results import Summary, summarize
from fleet.bench.sweep import Point, run_sweep, saturation_load
from workers.work import CompatKey

CONFIGS = (
    FleetConfig(8, 0, "fixed"),
    FleetConfig(8, 100, "adaptive"),
    FleetConfig(1, 0, "fixed"),
)
LONE_JOBS = 8


def uniform_mix(size: int, steps: int) -> RequestMix:
    return RequestMix(f"{size}px", (RequestShape(1, size, size, steps),))


def bare_calls(batch: int, jobs: int) -> int:
    return max(6, jobs // (2 * batch)) if batch > 1 else max(12, jobs // 4)


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
    def label(self) -> str:
        follow = self.point.load.follow
        return self.point.config.label + ("" if follow == Follow() else f", client {follow.label}")

    @property
    def ratio(self) -> float:
        return self.point.summary.images_per_s / self.bare_images_per_s

    @property
    def steady_ratio(self) -> float:
        return self.point.summary.steady_images_per_s / self.bare_images_per_s

    def to_dict(self) -> dict:
        return {
            "fleet": self.point.to_dict(),
            "bare_before": _bare(self.bare_before),
            "bare_after": _bare(self.bare_after),
            "ratio": self.ratio,
            "steady_ratio": self.steady_ratio,
        }


@dataclass
class Compiled:
    """A compiled fleet against the eager bare pipeline."""

    config: FleetConfig
    saturation: Summary
    lone: Summary
    bare8: list[BareRow]  # eager, before and after
    bare1: BareRow  # eager
    cold_start_s: float
    cached_start_s: float

    @property
    def bare8_images_per_s(self) -> float:
        return sum(r.images_per_s for r in self.bare8) / len(self.bare8)

    @property
    def speedup(self) -> float:
        return self.saturation.steady_images_per_s / self.bare8_images_per_s

    @property
    def lone_ratio(self) -> float:
        return self.lone.p("end_to_end", 50) / self.bare1.per_call_s

    def to_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "saturation": self.saturation.to_dict(),
            "lone": self.lone.to_dict(),
            "bare8_eager": [_bare(r) for r in self.bare8],
            "bare1_eager": _bare(self.bare1),
            "cold_start_s": self.cold_start_s,
            "cached_start_s": self.cached_start_s,
            "speedup_vs_eager_bare8": self.speedup,
            "lone_p50_vs_eager_bare1_call": self.lone_ratio,
        }


def _bare(row: BareRow) -> dict:
    return asdict(row) | {"images_per_s": row.images_per_s, "per_call_s": row.per_call_s}


def report(size: int, steps: int, pairs: list[Pair], compiled: Compiled | None = None) -> str:
    lines = [
        f"#### {size}x{size}, {steps} steps",
        "",
        "| fleet configuration | fleet images/s (steady) | bare images/s, same batch (before / after) "
        "| fleet / bare (steady) | batch sizes (images: calls) | model call, fleet vs bare | first call "
        "| CPU per image: API / Redis / client |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for pair in pairs:
        s, limit = pair.point.summary, pair.point.config.max_batch_images
        sizes = ", ".join(f"{k}: {v}" for k, v in s.batch_sizes.items())
        bare_call = (pair.bare_before.per_call_s + pair.bare_after.per_call_s) / 2
        lines.append(
            f"| {pair.label} | {s.images_per_s:.2f} ({s.steady_images_per_s:.2f}) "
            f"| {pair.bare_images_per_s:.2f} ({pair.bare_before.images_per_s:.2f} / "
            f"{pair.bare_after.images_per_s:.2f}) | **{pair.ratio:.2f}** ({pair.steady_ratio:.2f}) "
            f"| {sizes} | {s.phases['inference']['mean'] * 1000:.0f} ms vs {bare_call * 1000:.0f} ms (batch {limit}) "
            f"| {s.first_call_s * 1000:.0f} ms "
            f"| {' / '.join(f'{pair.point.cpu_ms_per_image(p):.1f}' for p in ('api', 'redis', 'client'))} ms |"
        )
    by_config: dict[str, list[Pair]] = {}
    for pair in pairs:
        by_config.setdefault(pair.point.config.label, []).append(pair)
    for label, same in by_config.items():
        if len(same) > 1:
            ratios = ", ".join(
                f"client {p.point.load.follow.label} **{p.ratio:.2f}** (steady {p.steady_ratio:.2f})" for p in same
            )
            lines += ["", f"- fleet / bare at {label}: {ratios}"]
    fixed = {
        p.point.config.max_batch_images: p
        for p in pairs
        if p.point.config.policy == "fixed"
        and p.point.config.engine == "process"
        and p.point.load.follow == pairs[0].point.load.follow
    }
    if 8 in fixed and 1 in fixed:
        bare_gain = fixed[8].bare_images_per_s / fixed[1].bare_images_per_s
        fleet_gain = fixed[8].point.summary.images_per_s / fixed[1].point.summary.images_per_s
        lines += [
            "",
            f"- bare batching gain (8 vs 1): **{bare_gain:.2f}x**; fleet batching gain (max 8 vs max 1): "
            f"**{fleet_gain:.2f}x** = **{fleet_gain / bare_gain:.2f}** of the bare gain",
            f"- fleet / bare at max batch 8: **{fixed[8].ratio:.2f}** (steady {fixed[8].steady_ratio:.2f}); "
            f"at max batch 1: **{fixed[1].ratio:.2f}** (steady {fixed[1].steady_ratio:.2f})",
        ]
    if compiled is not None:
        c = compiled
        lines += [
            "",
            f"Compiled ({c.config.compile}, warmed {c.config.warm}) against the eager bare pipeline:",
            "",
            "| | compiled fleet | eager bare | ratio |",
            "|---|---|---|---|",
            f"| images/s at max batch 8 (steady) | {c.saturation.steady_images_per_s:.2f} "
            f"| {c.bare8_images_per_s:.2f} (batch 8) | **{c.speedup:.2f}x** |",
            f"| lone job, end-to-end p50 | {c.lone.p('end_to_end', 50) * 1000:.0f} ms "
            f"| {c.bare1.per_call_s * 1000:.0f} ms (one batch-1 call) | **{c.lone_ratio:.2f}** |",
            f"| worker start: empty compile cache / filled | {c.cold_start_s:.1f} s / {c.cached_start_s:.1f} s "
            f"| | {c.cached_start_s / c.cold_start_s:.2f} |",
        ]
    return "\n".join(lines)


def run(
    size: int,
    steps: int,
    jobs: int,
    model_ref: str,
    device: str,
    out: Path | None,
    burst: bool = True,
    configs: tuple[FleetConfig, ...] = CONFIGS,
    compile_mode: str | None = None,
    follows: tuple[Follow, ...] = (Follow(),),
) -> str:
    """``burst``: all jobs sent at once (the issue's "same burst"); else a closed loop that
    keeps submitting while batches run. ``follows``: each configuration once per way of
    following the jobs (what a polling client costs the fleet, against a waiting one)."""
    from workers.backends import load_model
    from workers.protocol import EngineConfig

    model = load_model(EngineConfig.one(model_ref, device=device))
    key = CompatKey(model.name, size, size, steps, 7.5)
    pairs: list[Pair] = []
    compiled: Compiled | None = None

    def save() -> None:
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            raw = {"size": size, "steps": steps, "device": device, "pairs": [p.to_dict() for p in pairs]}
            if compiled is not None:
                raw["compiled"] = compiled.to_dict()
            out.write_text(json.dumps(raw, indent=2))
            out.with_suffix(".md").write_text(report(size, steps, pairs, compiled) + "\n")

    for config in configs:
        for follow in follows:
            calls = bare_calls(config.max_batch_images, jobs)
            before = time_bare(model, key, config.max_batch_images, calls)
            mix = uniform_mix(size, steps)
            (point,) = run_sweep(model_ref, [config], [], mix, saturation_jobs=jobs, burst=burst, follow=follow)
            after = time_bare(model, key, config.max_batch_images, calls)
            pairs.append(Pair(point, before, after))
            save()
            print(report(size, steps, pairs), flush=True)
    if compile_mode:
        compiled = run_compiled(model, key, model_ref, size, steps, jobs, compile_mode)
        save()
    return report(size, steps, pairs, compiled)


def run_compiled(model, key: CompatKey, model_ref: str, size: int, steps: int, jobs: int, mode: str) -> Compiled:
    config = FleetConfig(8, 0, "fixed", compile=mode, warm=f"{size}x{size}:1,8")
    mix = uniform_mix(size, steps)
    bare8 = [time_bare(model, key, 8, bare_calls(8, jobs))]
    bare1 = time_bare(model, key, 1, bare_calls(1, jobs))
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as tmp:
        with running_fleet(model_ref, config, Path(tmp) / "cold", size, FLEET_COMPILE_CACHE_DIR=cache) as fleet:
            cold_s = fleet.worker_start_s
            print(f"compiled worker ready in {cold_s:.1f} s (empty compile cache)", flush=True)
            load = saturation_load(config, jobs)
            saturation = summarize(run_load(fleet.api_url, mix, load))
            lone = summarize(run_load(fleet.api_url, mix, LoadSpec(concurrency=1, jobs=LONE_JOBS)))
        bare8.append(time_bare(model, key, 8, bare_calls(8, jobs)))
        with running_fleet(model_ref, config, Path(tmp) / "cached", size, FLEET_COMPILE_CACHE_DIR=cache) as fleet:
            cached_s = fleet.worker_start_s
            print(f"compiled worker ready in {cached_s:.1f} s (compile cache filled)", flush=True)
    return Compiled(config, saturation, lone, bare8, bare1, cold_s, cached_s)
