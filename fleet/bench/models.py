"""``fleet bench models``: what serving many models and adapters on one worker costs, and
what the digits adapters change, judged (docs/BENCHMARKS.md, section 12).

All on the digits model at its reference recipe (32x32, 20 DDIM steps, guidance 3, batches
of 8), in one process, each comparison interleaved round by round so that the machine's
drift falls on both sides alike:

- **adapters judged**: ``images`` images per recipe (no adapter, ``bold``, ``mirror``,
  both), the same seeds and prompts; the judge (``fleet.bench.judge``) reads adherence as
  drawn and mirrored back, and the ink each image holds (its mean pixel), each with a 95%
  interval;
- **adapter switch**: batch-8 calls with the same adapter as the last batch against calls
  that switch between ``bold`` and ``mirror`` (``set_adapters``), as a share of the call;
- **two models alternating**: the engine's ``ResidentModels`` holding the digits model and
  its int8 pool's model, batches alternating between them, against batches of one model;
- **swap**: the cost of loading a model the budget had evicted (load and warm-up), as
  batches' worth;
- **cold start**: a fresh engine process (spawn, imports, load, warm-up) until its first
  batch of 8 is done: what a job for a pool scaled to zero waits, beside the image pull
  and the node.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fleet.bench.judge import Interval, Judge, adherence
from workers.digits_data import SHIPPED, prompt
from workers.protocol import EngineConfig, ModelSpec
from workers.work import CompatKey, ImageWork

LORAS_DIR = SHIPPED.with_name("digits-loras")
ADAPTERS = (("bold", str(LORAS_DIR / "bold")), ("mirror", str(LORAS_DIR / "mirror")))
BATCH = 8
STEPS = 20
GUIDANCE = 3.0
SIDE = 32
RECIPES: dict[str, tuple[tuple[str, float], ...]] = {
    "no adapter": (),
    "bold": (("bold", 1.0),),
    "mirror": (("mirror", 1.0),),
    "bold + mirror": (("bold", 1.0), ("mirror", 1.0)),
}

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Plan:
    images: int = 500  # per judged recipe
    rounds: int = 12  # interleaved rounds of each timed comparison
    swaps: int = 5


def key(model: str = "digits", loras: tuple[tuple[str, float], ...] = ()) -> CompatKey:
    return CompatKey(model, SIDE, SIDE, STEPS, GUIDANCE, loras=loras)


def work(start: int, count: int = BATCH) -> list[ImageWork]:
    return [ImageWork(prompt(i % 10), None, i) for i in range(start, start + count)]


def ink(images: np.ndarray) -> Interval:
    """The mean pixel (0 to 1) of the images, with a normal 95% interval over images."""
    per_image = images.reshape(len(images), -1).mean(axis=1) / 255
    mean, half = float(per_image.mean()), 1.96 * float(per_image.std(ddof=1)) / len(per_image) ** 0.5
    return Interval(mean, mean - half, mean + half)


def judge_adapters(plan: Plan, progress: Progress) -> dict[str, Any]:
    from workers.pipeline import DiffusersModel

    judge = Judge()
    model = DiffusersModel.load(EngineConfig.one(str(SHIPPED), device="cpu", loras=ADAPTERS))
    asked = np.arange(plan.images) % 10
    rows = {}
    for index, (name, loras) in enumerate(RECIPES.items()):
        images = np.concatenate(
            [model.run(key(loras=loras), work(i, min(BATCH, plan.images - i))) for i in range(0, plan.images, BATCH)]
        )
        mirrored = images[:, :, ::-1]
        rows[name] = {
            "images": plan.images,
            "adherence": adherence(judge.predict(_digits(images)), asked).to_dict(),
            "adherence_mirrored_back": adherence(judge.predict(_digits(mirrored)), asked).to_dict(),
            "ink": ink(images).to_dict(),
        }
        progress("adapters judged", index + 1, len(RECIPES))
    return {"judge_accuracy": judge.accuracy.to_dict(), "recipes": rows}


def _digits(images: np.ndarray) -> np.ndarray:
    from workers.digits_data import to_digits

    return to_digits(np.ascontiguousarray(images))


def _timed(model: Any, key: CompatKey, images: list[ImageWork]) -> float:
    """Seconds ``model`` takes to run one call."""
    started = time.perf_counter()
    model.run(key, images)
    return time.perf_counter() - started


def adapter_switch(plan: Plan, progress: Progress) -> dict[str, Any]:
    """Per round: a call with no adapter, two calls on bold (the second switches nothing),
    then two that switch (mirror, then bold); the switch cost is the difference of the
    medians, per call."""
    from workers.pipeline import DiffusersModel

    model = DiffusersModel.load(EngineConfig.one(str(SHIPPED), device="cpu", loras=ADAPTERS))
    bold, mirror = key(loras=(("bold", 1.0),)), key(loras=(("mirror", 1.0),))
    model.run(bold, work(0))
    model.run(mirror, work(0))  # both loaded before timing
    same, switching, plain = [], [], []
    for r in range(plan.rounds):
        plain.append(_timed(model, key(), work(r * BATCH)))
        model.run(bold, work(0))
        same.append(_timed(model, bold, work(r * BATCH)))
        switching.append(_timed(model, mirror, work(r * BATCH)))
        switching.append(_timed(model, bold, work(r * BATCH)))
        progress("adapter switch", r + 1, plan.rounds)
    call, switched = statistics.median(same), statistics.median(switching)
    return {
        "no_adapter_call_s": statistics.median(plain),
        "batch_call_s": call,
        "switching_call_s": switched,
        "switch_share": (switched - call) / call,
        "rounds": plan.rounds,
    }


def two_models(plan: Plan, progress: Progress) -> dict[str, Any]:
    """Both models loaded (no budget): rounds of 2 batches of one model, and 2 batches that
    alternate the two models, interleaved; then the swap cost with a budget for one."""
    from tasks.settings import WarmShape
    from workers.backends import load_model
    from workers.resident import ResidentModels

    warm = (WarmShape(SIDE, SIDE, (BATCH,)),)  # as a worker warms the model's size
    specs = (
        ModelSpec(str(SHIPPED), name="digits", warm=warm),
        ModelSpec(str(SHIPPED), name="digits-int8", quantize="int8", warm=warm),
    )

    def load(spec: ModelSpec) -> Any:
        return load_model(EngineConfig((spec,), device="cpu"))

    both = ResidentModels(specs, 0, load)
    for name in ("digits", "digits-int8"):
        both.get(name)[0].run(key(name), work(0))
    one_s, two_s = 0.0, 0.0
    for r in range(plan.rounds):
        for name in ("digits", "digits"):
            one_s += _timed(both.get(name)[0], key(name), work(r * BATCH))
        for name in ("digits", "digits-int8"):
            two_s += _timed(both.get(name)[0], key(name), work(r * BATCH))
        progress("two models", r + 1, plan.rounds)
    images = 2 * plan.rounds * BATCH
    batch_s = one_s / (2 * plan.rounds)
    budget = int(both.get("digits")[0].weight_bytes() * 1.5)  # room for one
    swapping = ResidentModels(specs, budget, load)
    swap_s = []
    for s in range(plan.swaps):
        for name in ("digits", "digits-int8"):
            _, loaded = swapping.get(name)
            if loaded is not None and s > 0:
                swap_s.append(loaded.load_s + loaded.warm_s)
        progress("swaps", s + 1, plan.swaps)
    swap = statistics.median(swap_s)
    return {
        "one_model_images_per_s": images / one_s,
        "two_models_images_per_s": images / two_s,
        "ratio": one_s / two_s,
        "batch_s": batch_s,
        "swap_s": swap,
        "swap_in_batches": swap / batch_s,
        "swaps_timed": len(swap_s),
    }


def run(plan: Plan, progress: Progress) -> dict[str, Any]:
    return {
        "plan": {"images": plan.images, "rounds": plan.rounds, "batch": BATCH, "steps": STEPS},
        "adapters": judge_adapters(plan, progress),
        "adapter_switch": adapter_switch(plan, progress),
        "two_models": two_models(plan, progress),
        "cold_start": measure_cold_start(progress),
    }


class _Collect:
    """The engine's events for one batch, as ``workers.engine_client.EngineEvents``."""

    def __init__(self) -> None:
        import threading

        self.done = threading.Event()

    def batch_started(self, batch_id: int) -> None: ...

    def batch_step(self, batch_id: int, step: int, total: int) -> None: ...

    def batch_done(
        self, batch_id: int, images: Any, inference_s: float, canceled: bool, shared_images: float = 0.0
    ) -> None:
        self.done.set()

    def batch_failed(self, batch_id: int, error: str, out_of_memory: bool, call_images: int = 0) -> None:
        raise RuntimeError(error)

    def engine_died(self, reason: str) -> None:
        raise RuntimeError(reason)

    def device_memory(self, allocated: int, reserved: int, peak: int) -> None: ...

    def model_swapped(self, swapped: Any) -> None: ...


def measure_cold_start(progress: Progress) -> dict[str, Any]:
    from tasks.settings import WarmShape
    from workers.engine_client import ProcessEngine

    warm = (WarmShape(SIDE, SIDE, (BATCH,)),)
    engine = ProcessEngine(EngineConfig((ModelSpec(str(SHIPPED), name="digits", warm=warm),), device="cpu"))
    events = _Collect()
    started = time.perf_counter()
    ready = engine.start(events, timeout_s=300)
    at_ready = time.perf_counter()
    engine.submit(1, key(), work(0))
    events.done.wait(120)
    done = time.perf_counter()
    engine.stop(30)
    progress("cold start", 1, 1)
    return {
        "ready_s": at_ready - started,
        "load_s": ready.load_s,
        "warm_s": ready.warm_s,
        "first_batch_s": done - at_ready,
        "total_s": done - started,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| recipe | adherence as drawn | adherence mirrored back | ink (mean pixel) |",
        "|---|---|---|---|",
    ]
    for name, row in result["adapters"]["recipes"].items():
        lines.append(
            f"| {name} | {_pct(row['adherence'])} | {_pct(row['adherence_mirrored_back'])} | {_ink(row['ink'])} |"
        )
    switch, two, cold = result["adapter_switch"], result["two_models"], result["cold_start"]
    lines += [
        "",
        "| measure | result |",
        "|---|---|",
        f"| batch-8 call, no adapter (adapters loaded, disabled) | {switch['no_adapter_call_s'] * 1000:.0f} ms |",
        f"| batch-8 call, same adapter as the last | {switch['batch_call_s'] * 1000:.0f} ms |",
        f"| batch-8 call that switches adapter | {switch['switching_call_s'] * 1000:.0f} ms |",
        f"| adapter switch, share of a batch-8 call | {switch['switch_share']:+.1%} |",
        f"| two models alternating / one model, images/s | {two['ratio']:.2f}x "
        f"({two['two_models_images_per_s']:.1f} vs {two['one_model_images_per_s']:.1f}) |",
        f"| swap (load + warm an evicted model) | {two['swap_s'] * 1000:.0f} ms "
        f"= {two['swap_in_batches']:.2f} batches |",
        f"| cold start: engine spawned to ready | {cold['ready_s']:.1f} s (load {cold['load_s']:.2f} s, "
        f"warm {cold['warm_s']:.2f} s) |",
        f"| cold start: then its first batch of 8 | {cold['first_batch_s']:.2f} s (total {cold['total_s']:.1f} s) |",
    ]
    return "\n".join(lines)


def _pct(interval: dict[str, float]) -> str:
    return f"{interval['value']:.1%} [{interval['low']:.1%}, {interval['high']:.1%}]"


def _ink(interval: dict[str, float]) -> str:
    return f"{interval['value']:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]"


def write(result: dict[str, Any], out: Path) -> None:
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / "models.json").write_text(json.dumps(result, indent=2))
    (out / "models.md").write_text(markdown(result) + "\n")
