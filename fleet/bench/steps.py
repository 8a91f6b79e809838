"""``fleet bench steps``: step-level batching against request-level batching, on the same
loads (issue 26; docs/BENCHMARKS.md, section 13).

Each setup runs the worker's own runner and batcher (``workers.runner.ModelRunner``) and a
real engine process (``workers.engine_client.ProcessEngine``), once with the interactive
queue's policy as shipped (adaptive, batches of at most 8, ``batching=request``) and once
with ``batching=step``; no HTTP, broker or storage, whose costs are the same either way.

1. **Saturation**: a closed loop holding twice ``max_batch_images`` one-image jobs in the
   runner: images/s in each mode.
2. **Poisson loads** at 30%, 50% and 80% of the request-level saturation measured in the
   same run: p50, p95 and p99 of each job's latency (submit to images), images/s. Both modes
   get the same arrival times and seeds.
3. **Mixed steps**: half the jobs 10 steps, half 40, at 50% of saturation (counted in
   steps): the 10-step jobs' p95 in each mode, and the 40-step jobs'.

Beside each measured row, the queueing model's prediction (``predict``): the same arrival
times through an idealised engine whose call of ``n`` images and ``s`` steps takes
``(a*n + b) * s / S`` (``a`` and ``b`` fitted on this setup's request-level calls at batch 1
and 8, ``S`` its steps), either as whole calls (request-level) or step by step (a step of
``n`` running images takes ``(a*n + b) / S``; jobs join at any step boundary). The first 10%
of each row's jobs are warm-up and not counted.

The setups: a launch-bound simulated GPU (``sim:profile=tiny-cpu-64`` with half of every
step spent in GIL-holding Python, as an eager pipeline's kernel launches are), the tiny model
at 64x64 (real UNet, CPU, dominated by per-call overhead), the reference workload (the tiny
model at 128x128, docs/DESIGN.md) and the digits model at its reference recipe (32x32,
guidance 3: the model the quality figures judge).
"""

from __future__ import annotations

import itertools
import random
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.bench.stats import percentile
from tasks.settings import BatchingMode, WarmShape
from workers.batcher import Batcher, BatchPolicy
from workers.protocol import EngineConfig
from workers.work import CompatKey, ImageWork

MAX_IMAGES = 8
LOADS = (0.3, 0.5, 0.8)
MIXED_STEPS = (10, 40)
MIXED_LOAD = 0.5
WARMUP_FRACTION = 0.1
MODES: tuple[BatchingMode, ...] = ("request", "step")

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Setup:
    label: str
    model: str  # a sim: spec or a diffusers directory
    side: int
    steps: int
    guidance: float
    device: str = "cpu"

    def key(self, steps: int | None = None) -> CompatKey:
        return CompatKey(self.model, self.side, self.side, steps or self.steps, self.guidance)


def setups(tiny_model: str) -> dict[str, Setup]:
    from workers.digits_data import SHIPPED

    return {
        "sim": Setup(
            "simulated GPU, launch-bound (tiny-cpu-64 profile, host share 0.5), 64x64, 20 steps",
            "sim:profile=tiny-cpu-64,host=0.5,steps=20", 64, 20, 7.5,
        ),
        "tiny64": Setup("tiny model, 64x64, 20 DDIM steps, guidance 7.5, CPU", tiny_model, 64, 20, 7.5),
        "reference": Setup("reference workload: tiny model, 128x128, 20 DDIM steps, CPU", tiny_model, 128, 20, 7.5),
        "digits": Setup("digits model (the quality reference), 32x32, 20 DDIM steps, guidance 3, CPU",
                        str(SHIPPED), 32, 20, 3.0),
    }  # fmt: skip


# -- the queueing model --------------------------------------------------------------------
def predict(mode: BatchingMode, a: float, b: float, steps: int, jobs: list[tuple[float, int]]) -> list[float]:
    """Each job's latency, for one-image ``jobs`` (arrival time, steps) in arrival order,
    on an idealised engine (see the module's docstring)."""
    latencies = [0.0] * len(jobs)
    arrivals = deque(enumerate(jobs))
    waiting: deque[tuple[int, float, int]] = deque()
    now = 0.0

    def arrive(until: float) -> None:
        while arrivals and arrivals[0][1][0] <= until:
            index, (at, job_steps) = arrivals.popleft()
            waiting.append((index, at, job_steps))

    if mode == "request":
        while arrivals or waiting:
            arrive(now)
            if not waiting:
                now = arrivals[0][1][0]
                continue
            key = waiting[0][2]  # the oldest job's steps: its batch takes only its own
            batch = [w for w in waiting if w[2] == key][:MAX_IMAGES]
            for w in batch:
                waiting.remove(w)
            now += (a * len(batch) + b) * key / steps
            for index, at, _ in batch:
                latencies[index] = now - at
        return latencies
    running: list[list[Any]] = []  # [index, arrival, steps left]
    while arrivals or waiting or running:
        arrive(now)
        while waiting and len(running) < MAX_IMAGES:
            index, at, job_steps = waiting.popleft()
            running.append([index, at, job_steps])
        if not running:
            now = arrivals[0][1][0]
            continue
        now += (a * len(running) + b) / steps
        for slot in running:
            slot[2] -= 1
            if slot[2] == 0:
                latencies[slot[0]] = now - slot[1]
        running = [slot for slot in running if slot[2] > 0]
    return latencies


# -- measuring -------------------------------------------------------------------------------
class Bench:
    """One setup's engine and runner in one batching mode."""

    def __init__(self, setup: Setup, mode: BatchingMode):
        from workers.engine_client import ProcessEngine
        from workers.runner import ModelRunner

        self.setup = setup
        warm = (WarmShape(setup.side, setup.side, (1, MAX_IMAGES)),)
        engine = ProcessEngine(EngineConfig.one(setup.model, device=setup.device, warm=warm))
        policy = BatchPolicy(MAX_IMAGES, max_wait_s=0.1, kind="adaptive", batching=mode)
        self.runner = ModelRunner(engine, Batcher(policy))
        self.runner.start(timeout_s=600)
        self._seeds = itertools.count()

    def close(self) -> None:
        self.runner.stop(120)

    def submit(self, steps: int | None = None) -> Future[Any]:
        seed = next(self._seeds)
        work = [ImageWork(f"a picture {seed % 10}", None, seed)]
        return self.runner.submit(self.setup.key(steps), work, job_id=f"job-{seed}")

    def lone_call_s(self, calls: int = 5) -> float:
        """The median model time of a call of one image, each job sent once the last is done."""
        return statistics.median(self.submit().result(300).inference_s for _ in range(calls))

    def saturation(self, jobs: int) -> tuple[float, list[Any]]:
        """Images/s with ``2 * MAX_IMAGES`` jobs always in the runner, and the jobs' results."""
        done: list[float] = []
        results: list[Any] = []
        lock = threading.Condition()

        def finished(future: Future[Any]) -> None:
            with lock:
                done.append(time.monotonic())
                results.append(future.result())
                lock.notify_all()

        sent = 0
        with lock:
            while len(done) < jobs:
                while sent < jobs and sent - len(done) < 2 * MAX_IMAGES:
                    self.submit().add_done_callback(finished)
                    sent += 1
                lock.wait(60)
        counted = done[int(len(done) * WARMUP_FRACTION) :]
        return (len(counted) - 1) / (counted[-1] - counted[0]), results

    def open_loop(self, jobs: list[tuple[float, int]]) -> list[float]:
        """Submits each job at its arrival time (seconds from now); each one's latency."""
        latencies = [0.0] * len(jobs)
        futures = []
        start = time.monotonic()
        for index, (at, steps) in enumerate(jobs):
            delay = start + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            submitted = time.monotonic()
            future = self.submit(steps)

            def finished(_: Future[Any], index: int = index, submitted: float = submitted) -> None:
                latencies[index] = time.monotonic() - submitted

            future.add_done_callback(finished)
            futures.append(future)
        for future in futures:
            future.result(600)
        return latencies


def poisson(rate: float, count: int, steps: tuple[int, ...], seed: int) -> list[tuple[float, int]]:
    """``count`` arrival times at ``rate`` jobs/s, each with steps drawn from ``steps``."""
    rng = random.Random(seed)
    at, jobs = 0.0, []
    for _ in range(count):
        at += rng.expovariate(rate)
        jobs.append((at, rng.choice(steps)))
    return jobs


def summary(latencies: list[float], jobs: list[tuple[float, int]], only: int | None = None) -> dict[str, float]:
    """p50/p95/p99 in seconds (of the jobs of ``only`` steps, if given) past the warm-up."""
    skip = int(len(jobs) * WARMUP_FRACTION)
    kept = [lat for lat, job in zip(latencies[skip:], jobs[skip:], strict=True) if only is None or job[1] == only]
    return {"p50": percentile(kept, 50), "p95": percentile(kept, 95), "p99": percentile(kept, 99), "jobs": len(kept)}


def run_setup(setup: Setup, jobs: int, progress: Progress) -> dict[str, Any]:
    """Both modes on one setup: saturation, the Poisson loads and the mixed steps."""
    rows: dict[str, dict[str, Any]] = {}
    benches = {}
    try:
        for mode in MODES:
            benches[mode] = Bench(setup, mode)
        call_1 = benches["request"].lone_call_s()
        saturated = {mode: bench.saturation(jobs) for mode, bench in benches.items()}
        saturation = {mode: rate for mode, (rate, _) in saturated.items()}
        full = [r.inference_s for r in saturated["request"][1] if r.batch_images == MAX_IMAGES]
        call_8 = statistics.median(full)
        a = (call_8 - call_1) / (MAX_IMAGES - 1)
        b = call_1 - a
        progress(setup.label, 1, len(LOADS) + 2)
        loads: list[tuple[str, float, tuple[int, ...]]] = [(f"{load:.0%} load", load, (setup.steps,)) for load in LOADS]
        mean_steps = statistics.mean(MIXED_STEPS)
        loads.append(("mixed 10/40 steps, 50% load", MIXED_LOAD * setup.steps / mean_steps, MIXED_STEPS))
        for index, (name, load, steps) in enumerate(loads):
            arrivals = poisson(load * saturation["request"], jobs, steps, seed=index)
            order = MODES if index % 2 == 0 else MODES[::-1]  # drift falls on both alike
            measured = {mode: benches[mode].open_loop(arrivals) for mode in order}
            row: dict[str, Any] = {"load": load, "rate": load * saturation["request"]}
            for mode in MODES:
                predicted = predict(mode, a, b, setup.steps, arrivals)
                span = max(at + lat for (at, _), lat in zip(arrivals, measured[mode], strict=True))
                row[mode] = {
                    "measured": summary(measured[mode], arrivals),
                    "predicted": summary(predicted, arrivals),
                    "images_per_s": len(arrivals) / span,
                }
                if len(steps) > 1:
                    for count in steps:
                        row[mode][f"measured_{count}"] = summary(measured[mode], arrivals, count)
                        row[mode][f"predicted_{count}"] = summary(predicted, arrivals, count)
            rows[name] = row
            progress(setup.label, index + 2, len(LOADS) + 2)
    finally:
        for bench in benches.values():
            bench.close()
    return {
        "setup": setup.label,
        "model": setup.model,
        "call_1_s": call_1,
        "call_8_s": call_8,
        "profile": {"a": a, "b": b},
        "saturation_images_per_s": saturation,
        "rows": rows,
    }


def decode_cost(setup: Setup) -> dict[str, float]:
    """On ``setup``'s model, size and device: a step of 8 running images, and decoding
    finished ones (1, 8 at once, 8 batches of one at once), in seconds (medians of 10):
    what a batch leaving costs the others' next step, decoded at once or one image per
    step boundary."""
    from workers.pipeline import DiffusersModel

    model = DiffusersModel.load(EngineConfig.one(setup.model, device=setup.device))
    key = CompatKey(model.name, setup.side, setup.side, setup.steps, setup.guidance)
    stepper = model.stepper(key)
    assert stepper is not None
    images = [ImageWork("a picture", None, seed) for seed in range(MAX_IMAGES)]

    def timed(action: Callable[[], Any]) -> float:
        times = []
        for _ in range(10):
            started = time.perf_counter()
            action()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    (eight,) = stepper.admit([(key, images)])
    ones = stepper.admit([(key, [image]) for image in images])
    return {
        "step_8_s": timed(lambda: stepper.step([eight])),
        "decode_1_s": timed(lambda: stepper.decode(ones[:1])),
        "decode_8_s": timed(lambda: stepper.decode([eight])),
        "decode_8_batches_of_1_s": timed(lambda: stepper.decode(ones)),
    }


def run(
    tiny_model: str, names: list[str], jobs: int, progress: Progress, custom: Setup | None = None
) -> dict[str, Any]:
    """The named setups; ``model`` is ``custom`` (a model directory on a device of its own:
    the GPU rows)."""
    chosen = setups(tiny_model)
    if custom is not None:
        chosen["model"] = custom
    decoded = "model" if "model" in names else "tiny64"
    return {
        "plan": {"jobs_per_row": jobs, "max_batch_images": MAX_IMAGES, "loads": LOADS, "mixed_steps": MIXED_STEPS},
        "setups": {name: run_setup(chosen[name], jobs, progress) for name in names},
        "decode_setup": decoded,
        "decode": decode_cost(chosen[decoded]),
    }


# -- reporting -------------------------------------------------------------------------------
def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def markdown(result: dict[str, Any]) -> str:
    lines = []
    for name, setup in result["setups"].items():
        sat = setup["saturation_images_per_s"]
        lines += [
            f"**{setup['setup']}** (`{name}`): a call takes {_ms(setup['call_1_s'])} ms at batch 1, "
            f"{_ms(setup['call_8_s'])} ms at batch 8. Saturation: request-level {sat['request']:.2f} images/s, "
            f"step-level {sat['step']:.2f} ({sat['step'] / sat['request']:.2f}x).",
            "",
            "| load | mode | p50 ms | p95 ms | p99 ms | images/s | model p50 / p95 / p99 ms | p95 step/request |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row_name, row in setup["rows"].items():
            for mode in MODES:
                measured, predicted = row[mode]["measured"], row[mode]["predicted"]
                ratio = row["step"]["measured"]["p95"] / row["request"]["measured"]["p95"]
                lines.append(
                    f"| {row_name} | {mode} | {_ms(measured['p50'])} | {_ms(measured['p95'])} | "
                    f"{_ms(measured['p99'])} | {row[mode]['images_per_s']:.2f} | {_ms(predicted['p50'])} / "
                    f"{_ms(predicted['p95'])} / {_ms(predicted['p99'])} | {f'{ratio:.2f}x' * (mode == 'step')} |"
                )
                for count in MIXED_STEPS:
                    if f"measured_{count}" in row[mode]:
                        part, model = row[mode][f"measured_{count}"], row[mode][f"predicted_{count}"]
                        short = row["step"][f"measured_{count}"]["p95"] / row["request"][f"measured_{count}"]["p95"]
                        lines.append(
                            f"| ... its {count}-step jobs | {mode} | {_ms(part['p50'])} | {_ms(part['p95'])} | "
                            f"{_ms(part['p99'])} | | {_ms(model['p50'])} / {_ms(model['p95'])} / {_ms(model['p99'])} "
                            f"| {f'{short:.2f}x' * (mode == 'step')} |"
                        )
        lines.append("")
    decode = result["decode"]
    lines.append(
        f"Decode ({result.get('decode_setup', 'tiny64')}): a step of 8 running images {_ms(decode['step_8_s'])} ms; "
        f"decoding 8 finished images at once {_ms(decode['decode_8_s'])} ms, one {_ms(decode['decode_1_s'])} ms "
        f"(8 one at a time: {_ms(8 * decode['decode_1_s'])} ms)."
    )
    return "\n".join(lines)


def plot(result: dict[str, Any], out: Path) -> None:
    """p95 against load, both modes, measured (dots) and the queueing model (lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["setups"])
    figure, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        setup = result["setups"][name]
        rows = [row for row in setup["rows"].values() if f"measured_{MIXED_STEPS[0]}" not in row["request"]]
        for mode, colour in zip(MODES, ("tab:red", "tab:blue"), strict=True):
            loads = [row["load"] for row in rows]
            axis.plot(loads, [row[mode]["measured"]["p95"] * 1000 for row in rows], "o-", color=colour, label=mode)
            axis.plot(loads, [row[mode]["predicted"]["p95"] * 1000 for row in rows], "--", color=colour, alpha=0.5,
                      label=f"{mode}, queueing model")  # fmt: skip
        axis.set_title(name)
        axis.set_xlabel("load (share of request-level saturation)")
        axis.set_ylabel("p95 latency, ms")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def write(result: dict[str, Any], out: Path) -> None:
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / "steps.json").write_text(json.dumps(result, indent=2))
    (out / "steps.md").write_text(markdown(result) + "\n")
    plot(result, out / "steps.png")
