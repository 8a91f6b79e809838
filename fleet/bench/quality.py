"""``fleet bench quality``: what each speed lever costs in image quality, measured on the
digits model (``workers.digits``), beside what it buys in throughput and latency.

Each recipe (steps, scheduler, guidance; precision per worker pool) generates the same
images: ``per_digit`` seeds for each digit 0-9, prompt ``"a handwritten D"``, in calls of
``BATCH`` images through the worker's own model code (``workers.pipeline.DiffusersModel``,
as the engine process runs it). Its row has:

- **images/s** at batch ``BATCH`` over those calls (the first call of each recipe, which
  pays for any lazy set-up, not counted), and a **lone job's latency** (median of
  ``LONE_CALLS`` calls of one image);
- the judge's figures (``fleet.bench.judge``): adherence, Fréchet distance to the real
  held-out digits, diversity, and PSNR against the reference recipe's image of the same seed,
  each with its 95% interval.

The real held-out digits are a row of their own: the ceiling. Writes ``OUT.json``,
``OUT.md`` and ``OUT.png`` (quality against throughput).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fleet.bench.judge import Interval, Judge
from tasks.settings import Quantization

BATCH = 8
LONE_CALLS = 5
#: classifier-free guidance of every recipe unless it says otherwise
GUIDANCE = 3.0


@dataclass(frozen=True)
class Recipe:
    """What a job asks for (``steps``, ``scheduler``, ``guidance_scale``) and what its worker
    pool runs (``dtype``, ``quantize``, and the reference model or the one distilled from it)."""

    name: str
    steps: int
    scheduler: str | None = None  # None: the model's own (DDIM)
    guidance_scale: float = GUIDANCE
    dtype: str = "float32"
    quantize: Quantization = "none"
    distilled: bool = False

    @property
    def pool(self) -> str:
        """The worker pool that serves it: model, precision and weights."""
        parts = ["distilled" if self.distilled else "", self.dtype, "" if self.quantize == "none" else self.quantize]
        return " ".join(part for part in parts if part)


REFERENCE = Recipe("reference: DDIM 50", 50)
#: the levers on the CPU: fewer steps, each scheduler at few steps, bf16
RECIPES = (
    REFERENCE,
    Recipe("DDIM 20", 20),
    Recipe("DDIM 10", 10),
    Recipe("DDIM 5", 5),
    Recipe("Euler 10", 10, "EulerDiscreteScheduler"),
    Recipe("DPM-Solver++ 10", 10, "DPMSolverMultistepScheduler"),
    Recipe("UniPC 10", 10, "UniPCMultistepScheduler"),
    Recipe("DPM-Solver++ 5", 5, "DPMSolverMultistepScheduler"),
    Recipe("UniPC 5", 5, "UniPCMultistepScheduler"),
    Recipe("DDIM 50, no guidance", 50, guidance_scale=1.0),
    Recipe("bf16 DDIM 50", 50, dtype="bfloat16"),
    Recipe("bf16 UniPC 10", 10, "UniPCMultistepScheduler", dtype="bfloat16"),
    Recipe("int8 DDIM 50", 50, quantize="int8"),
    Recipe("int8 DDIM 10", 10, quantize="int8"),
    Recipe("DDIM 4", 4),
    Recipe("distilled: 4 steps, no guidance", 4, guidance_scale=1.0, distilled=True),
    Recipe("distilled int8: 4 steps", 4, guidance_scale=1.0, quantize="int8", distilled=True),
)


@dataclass
class Row:
    recipe: Recipe
    images_per_s: float
    lone_p50_s: float
    unet_bytes: int
    figures: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        figures = {k: v.to_dict() if isinstance(v, Interval) else v for k, v in self.figures.items()}
        return {
            "recipe": asdict(self.recipe),
            "images_per_s": round(self.images_per_s, 3),
            "lone_p50_s": round(self.lone_p50_s, 4),
            "pool": self.recipe.pool,
            "unet_bytes": self.unet_bytes,
            **figures,
        }


def run(
    model_dir: str,
    per_digit: int,
    recipes: tuple[Recipe, ...] = RECIPES,
    progress: bool = True,
    distilled_dir: str | None = None,
) -> dict:
    """Every recipe's row, the real row and the judge's own score, as one JSON document.
    The first recipe is the reference the others' PSNR is measured against; the distilled
    recipes run the model at ``distilled_dir`` (skipped without one)."""
    from tqdm import tqdm

    from workers.digits_data import SIDE, prompt
    from workers.pipeline import DiffusersModel
    from workers.protocol import EngineConfig
    from workers.quantize import module_bytes
    from workers.work import CompatKey, ImageWork

    judge = Judge()
    asked = np.repeat(np.arange(10), per_digit)
    work = [ImageWork(prompt(int(d)), None, 10_000 * int(d) + i % per_digit) for i, d in enumerate(asked)]
    models: dict[str, DiffusersModel] = {}
    rows: list[Row] = []
    reference: np.ndarray | None = None
    bar = tqdm(total=len(recipes) * (len(work) + LONE_CALLS), unit="image", disable=not progress)
    recipes = tuple(r for r in recipes if distilled_dir or not r.distilled)
    for recipe in recipes:
        bar.set_description(recipe.name)
        if recipe.pool not in models:
            where = distilled_dir if recipe.distilled and distilled_dir else model_dir
            config = EngineConfig.one(where, device="cpu", dtype=recipe.dtype, quantize=recipe.quantize)
            models[recipe.pool] = DiffusersModel.load(config)
        model = models[recipe.pool]
        key = CompatKey(model.name, SIDE, SIDE, recipe.steps, recipe.guidance_scale, recipe.scheduler)
        model.run(key, work[:BATCH])  # set-up: not timed
        started, images = time.perf_counter(), []
        for i in range(0, len(work), BATCH):
            images.append(model.run(key, work[i : i + BATCH]))
            bar.update(len(work[i : i + BATCH]))
        images_per_s = len(work) / (time.perf_counter() - started)
        lone = []
        for i in range(LONE_CALLS):
            began = time.perf_counter()
            model.run(key, [work[i * per_digit]])
            lone.append(time.perf_counter() - began)
            bar.update(1)
        generated = np.concatenate(images)
        if reference is None:
            reference = generated
        figures = judge.score(generated, asked, None if recipe is recipes[0] else reference)
        rows.append(Row(recipe, images_per_s, statistics.median(lone), module_bytes(model.pipe.unet), figures))
    bar.close()
    from workers.digits import real_images

    real = judge.score(real_images(judge.held_out.images), judge.held_out.labels)
    real["frechet"] = judge.real_halves()
    return {
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "model": model_dir,
        "distilled_model": distilled_dir,
        "per_digit": per_digit,
        "batch": BATCH,
        "judge": {
            "kind": "MLPClassifier(64)",
            "held_out_accuracy": judge.accuracy.to_dict(),
            "held_out_images": len(judge.held_out.labels),
        },
        "real": {k: v.to_dict() if isinstance(v, Interval) else v for k, v in real.items()},
        "recipes": [row.to_dict() for row in rows],
    }


def _cell(figure: dict | None) -> str:
    if figure is None:
        return "—"
    return f"{figure['value']:.3g} [{figure['low']:.3g}, {figure['high']:.3g}]"


def markdown_table(result: dict) -> str:
    reference = result["recipes"][0]
    lines = [
        "| recipe | pool | UNet weights | images/s (batch 8) | vs reference | lone job p50 | adherence "
        "| Fréchet distance | diversity | PSNR vs reference (dB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["recipes"]:
        recipe = row["recipe"]
        lines.append(
            f"| {recipe['name']} | {row['pool']} | {row['unet_bytes'] / 2**20:.2f} MiB "
            f"| {row['images_per_s']:.1f} "
            f"| {row['images_per_s'] / reference['images_per_s']:.2f}x | {row['lone_p50_s'] * 1000:.0f} ms "
            f"| {_cell(row['adherence'])} | {_cell(row['frechet'])} | {_cell(row['diversity'])} "
            f"| {_cell(row.get('psnr_db'))} |"
        )
    real = result["real"]
    lines.append(
        f"| real held-out digits ({real['images']}) | — | — | — | — | — | {_cell(real['adherence'])} "
        f"| {_cell(real['frechet'])} (two halves) | {_cell(real['diversity'])} | — |"
    )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Adherence and Fréchet distance against images/s, one point per recipe (its lone
    latency in the legend), the real digits as a line: the frontier is up and to the right
    on the left panel, down and to the right on the other."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), dpi=120)
    for ax, metric, label in (
        (axes[0], "adherence", "adherence (judge reads the digit asked)"),
        (axes[1], "frechet", "Fréchet distance to real digits (lower is better)"),
    ):
        for i, row in enumerate(result["recipes"]):
            x, figure = row["images_per_s"], row[metric]
            err = [[figure["value"] - figure["low"]], [figure["high"] - figure["value"]]]
            marker = {"float32": "o", "float32 int8": "D", "distilled float32": "*"}.get(row["pool"], "s")
            name = f"{row['recipe']['name']} ({row['lone_p50_s'] * 1000:.0f} ms)"
            colour = plt.get_cmap("tab20")(i % 20)  # a colour per recipe: more than the default ten
            ax.errorbar([x], [figure["value"]], yerr=err, fmt=marker, capsize=3, label=name, color=colour)
        ax.axhline(result["real"][metric]["value"], color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("images/s at batch 8 (log); in brackets: a lone job's p50 latency")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), title="recipe (lone p50)")
    axes[0].set_title("dashed: real held-out digits (the ceiling)", fontsize=9)
    axes[1].set_title("dashed: two halves of the real digits (the floor)", fontsize=9)
    fig.suptitle(f"Quality against throughput: digits model, {result['per_digit'] * 10} images per recipe", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown_table(result) + "\n")
    plot(result, out.with_suffix(".png"))
