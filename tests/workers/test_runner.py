"""The model thread loads, warms and runs the model on one thread, and reports failures."""

from __future__ import annotations

import threading

import pytest
from PIL import Image

from workers.pipeline import CompatKey, ImageWork
from workers.runner import ModelRunner

KEY = CompatKey("fake", 8, 8, 1, 1.0)


class FakeModel:
    name = "fake"

    def __init__(self, fail_on: str | None = None):
        self.threads: set[int] = set()
        self.fail_on = fail_on

    def warm(self, width, height):
        self.threads.add(threading.get_ident())

    def run(self, key, images):
        self.threads.add(threading.get_ident())
        if any(w.prompt == self.fail_on for w in images):
            raise ValueError("bad prompt")
        return [Image.new("RGB", (key.width, key.height)) for _ in images]


def test_load_warm_and_run_happen_on_the_one_model_thread():
    model = FakeModel()
    runner = ModelRunner(lambda: model, (8, 8))
    runner.start(timeout_s=5)
    results = [runner.submit(KEY, [ImageWork("a", None, i)]).result(5) for i in range(3)]
    runner.stop()
    assert len(model.threads) == 1 and threading.get_ident() not in model.threads
    assert all(r.batch_images == 1 and r.inference_s >= 0 for r in results)


def test_a_failing_call_fails_only_its_future():
    runner = ModelRunner(lambda: FakeModel(fail_on="bad"), (8, 8))
    runner.start(timeout_s=5)
    with pytest.raises(ValueError):
        runner.submit(KEY, [ImageWork("bad", None, 0)]).result(5)
    assert len(runner.submit(KEY, [ImageWork("ok", None, 0)]).result(5).images) == 1
    runner.stop()


def test_a_model_that_cannot_load_fails_start():
    def load():
        raise FileNotFoundError("no model here")

    runner = ModelRunner(load, (8, 8))
    with pytest.raises(RuntimeError, match="no model here"):
        runner.start(timeout_s=5)
