"""The model thread: one thread loads, warms and runs the model; jobs batch together; a
failing batch is split so only the bad job fails; out-of-memory halves the batch."""

from __future__ import annotations

import threading
import time

import pytest
from PIL import Image

from tasks.errors import ModelOutOfMemory
from workers.batcher import Batcher, BatchPolicy
from workers.runner import ModelRunner
from workers.work import CompatKey, ImageWork

KEY = CompatKey("fake", 8, 8, 1, 1.0)


class FakeModel:
    """Sleeps a little per call; fails on a poison prompt or above a memory limit."""

    name = "fake"

    def __init__(self, fail_on: str | None = None, memory_images: int = 1000, call_s: float = 0.02):
        self.threads: set[int] = set()
        self.calls: list[list[str]] = []
        self.fail_on = fail_on
        self.memory_images = memory_images
        self.call_s = call_s

    def warm(self, width, height):
        self.threads.add(threading.get_ident())

    def run(self, key, images):
        self.threads.add(threading.get_ident())
        self.calls.append([w.prompt for w in images])
        time.sleep(self.call_s)
        if len(images) > self.memory_images:
            raise ModelOutOfMemory(f"{len(images)} images do not fit")
        if any(w.prompt == self.fail_on for w in images):
            raise ValueError("bad prompt")
        return [Image.new("RGB", (key.width, key.height), (w.seed % 256, 0, 0)) for w in images]


def make_runner(model: FakeModel, max_images=8, wait_s=0.05) -> ModelRunner:
    runner = ModelRunner(lambda: model, (8, 8), Batcher(BatchPolicy(max_images, wait_s)))
    runner.start(timeout_s=5)
    return runner


def work(prompt: str, count: int = 1, seed: int = 0) -> list[ImageWork]:
    return [ImageWork(prompt, None, seed + i) for i in range(count)]


def test_load_warm_and_run_happen_on_the_one_model_thread():
    model = FakeModel()
    runner = make_runner(model)
    results = [runner.submit(KEY, work("a")).result(5) for _ in range(3)]
    runner.stop()
    assert len(model.threads) == 1 and threading.get_ident() not in model.threads
    assert all(r.batch_images == 1 and r.inference_s > 0 for r in results)


def test_a_burst_runs_in_full_batches_and_each_job_gets_its_own_images():
    model = FakeModel(call_s=0.05)
    runner = make_runner(model, max_images=4, wait_s=0.5)
    futures = [runner.submit(KEY, work(f"p{i}", seed=i)) for i in range(8)]
    results = [f.result(5) for f in futures]
    runner.stop()
    assert [len(call) for call in model.calls] == [4, 4]
    assert [r.images[0].getpixel((0, 0))[0] for r in results] == list(range(8))
    assert len({r.batch_id for r in results}) == 2 and {r.batch_images for r in results} == {4}


def test_a_failing_batch_is_split_so_only_the_bad_job_fails():
    model = FakeModel(fail_on="poison")
    runner = make_runner(model, max_images=8, wait_s=0.5)
    names = ["a", "b", "poison", "c", "d"]
    futures = {name: runner.submit(KEY, work(name)) for name in names}
    with pytest.raises(ValueError, match="bad prompt"):
        futures["poison"].result(5)
    for name in ("a", "b", "c", "d"):
        assert len(futures[name].result(5).images) == 1
    runner.stop()
    assert model.calls[0] == names and ["poison"] in model.calls


def test_out_of_memory_halves_the_batch_and_keeps_the_lower_limit():
    model = FakeModel(memory_images=2)
    runner = make_runner(model, max_images=8, wait_s=0.5)
    first = [runner.submit(KEY, work(f"a{i}")) for i in range(8)]
    assert all(len(f.result(5).images) == 1 for f in first)
    second = [runner.submit(KEY, work(f"b{i}")) for i in range(4)]
    assert all(len(f.result(5).images) == 1 for f in second)
    runner.stop()
    later = [len(c) for c in model.calls if c[0].startswith("b")]
    assert later and max(later) <= 4


def test_a_multi_image_job_that_does_not_fit_in_memory_is_split_within_itself():
    model = FakeModel(memory_images=1)
    runner = make_runner(model, max_images=4, wait_s=0)
    result = runner.submit(KEY, work("big", 4)).result(5)
    runner.stop()
    assert len(result.images) == 4 and [im.getpixel((0, 0))[0] for im in result.images] == [0, 1, 2, 3]


def test_stop_finishes_the_work_already_queued():
    model = FakeModel(call_s=0.05)
    runner = make_runner(model, max_images=2, wait_s=10)
    futures = [runner.submit(KEY, work(f"p{i}")) for i in range(3)]
    runner.stop()
    assert all(f.done() and not f.exception() for f in futures)


def test_a_model_that_cannot_load_fails_start():
    def load():
        raise FileNotFoundError("no model here")

    runner = ModelRunner(load, (8, 8), Batcher(BatchPolicy()))
    with pytest.raises(RuntimeError, match="no model here"):
        runner.start(timeout_s=5)
