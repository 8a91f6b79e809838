"""Sweeps: every configuration under every load, and the latency-throughput plot.

    fleet bench sweep --model sim:profile=tiny-cpu-64 --mix reference-64 \\
        --config 1:0:fixed --config 8:0:fixed --config 8:200:fixed --config 8:100:adaptive \\
        --rates 2,4,8,12 --saturation --jobs 150 --out docs/bench/sweep

Each configuration gets a fresh fleet; each load point is an open-loop Poisson run (or,
with ``--saturation``, a closed-loop run that keeps every worker's queue full).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fleet.bench.cputime import fleet_cpu_s
from fleet.bench.fleetrun import FleetConfig, running_fleet
from fleet.bench.follow import Follow
from fleet.bench.load import LoadSpec, run_load
from fleet.bench.mix import RequestMix
from fleet.bench.results import Summary, summarize


@dataclass
class Point:
    config: FleetConfig
    load: LoadSpec
    summary: Summary
    # CPU seconds used during the run by the API, Redis and the load generator: what
    # following the jobs cost beside the model (empty where there is no /proc).
    cpu_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "load": asdict(self.load),
            "summary": self.summary.to_dict(),
            "cpu_s": self.cpu_s,
        }

    def cpu_ms_per_image(self, process: str) -> float:
        images = self.summary.images
        return self.cpu_s[process] / images * 1000 if process in self.cpu_s and images else float("nan")


def saturation_load(config: FleetConfig, jobs: int, burst: bool = False, follow: Follow = Follow()) -> LoadSpec:
    """Enough clients that a full batch is always waiting while one runs, on every worker;
    or, for a burst, every job sent at once (submission then overlaps only the first batches)."""
    if burst:
        return LoadSpec(concurrency=jobs, jobs=jobs, follow=follow)
    return LoadSpec(concurrency=4 * config.workers * config.max_batch_images, jobs=jobs, follow=follow)


def run_sweep(
    model: str,
    configs: list[FleetConfig],
    loads: list[LoadSpec],
    mix: RequestMix,
    saturation_jobs: int = 0,
    burst: bool = False,
    follow: Follow = Follow(),
) -> list[Point]:
    """``follow``: how the saturation run's clients follow their jobs (``loads`` say their own)."""
    points = []
    size = mix.shapes[0].width
    for config in configs:
        with tempfile.TemporaryDirectory() as tmp, running_fleet(model, config, Path(tmp), size) as fleet:
            saturation = [saturation_load(config, saturation_jobs, burst, follow)] if saturation_jobs else []
            for load in list(loads) + saturation:
                before = fleet_cpu_s(fleet.pids)
                run = run_load(fleet.api_url, mix, load)
                cpu = {name: used - before[name] for name, used in fleet_cpu_s(fleet.pids).items()}
                summary = summarize(run)
                print(
                    f"{config.label} | {load.label}: {summary.images_per_s:.2f} images/s, "
                    f"p95 {summary.p('end_to_end'):.3f} s, mean batch {summary.mean_batch:.2f}",
                    flush=True,
                )
                points.append(Point(config, load, summary, cpu))
    return points


def plot(records: list[dict], path: Path, title: str) -> None:
    """p95 end-to-end latency against achieved throughput: one line per configuration
    through its open-loop points in order of offered load, and a star for its closed-loop
    saturation run. ``records`` are ``Point.to_dict()`` values, so a sweep's JSON can be
    drawn again."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    by_config: dict[str, list[dict]] = {}
    for record in records:
        by_config.setdefault(FleetConfig(**record["config"]).label, []).append(record)
    for label, series in by_config.items():
        open_loop = sorted((r for r in series if r["load"]["rate"] is not None), key=lambda r: r["load"]["rate"])
        (line,) = ax.plot(
            [r["summary"]["images_per_s"] for r in open_loop],
            [r["summary"]["phases"]["end_to_end"]["p95"] for r in open_loop],
            marker="o",
            label=label,
        )
        saturated = [r for r in series if r["load"]["rate"] is None]
        ax.scatter(
            [r["summary"]["images_per_s"] for r in saturated],
            [r["summary"]["phases"]["end_to_end"]["p95"] for r in saturated],
            marker="*",
            s=120,
            color=line.get_color(),
        )
    ax.set_xlabel("achieved throughput (images/s)")
    ax.set_ylabel("p95 end-to-end latency (s)")
    ax.set_yscale("log")
    ax.set_title(title + "\n(lines: Poisson load; stars: closed loop at saturation)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def markdown_table(points: list[Point]) -> str:
    lines = [
        "| configuration | load | images/s | steady images/s | mean batch | p50 e2e | p95 e2e | p99 e2e "
        "| p50 overhead | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        s = p.summary
        lines.append(
            f"| {p.config.label} | {p.load.label} | {s.images_per_s:.2f} | {s.steady_images_per_s:.2f} "
            f"| {s.mean_batch:.2f} "
            f"| {s.p('end_to_end', 50) * 1000:.0f} ms | {s.p('end_to_end') * 1000:.0f} ms "
            f"| {s.p('end_to_end', 99) * 1000:.0f} ms | {s.p('overhead', 50) * 1000:.0f} ms "
            f"| {sum(s.errors.values())} |"
        )
    return "\n".join(lines)


def write(points: list[Point], out: Path, title: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps([p.to_dict() for p in points], indent=2))
    out.with_suffix(".md").write_text(markdown_table(points) + "\n")
    plot([p.to_dict() for p in points], out.with_suffix(".png"), title)
