"""The engine loop and its process: batches run in order with a step report each, a cancel
lands at the next step boundary, a device error ends the engine, and the process engine
returns images through shared memory and reports its own death at once."""

from __future__ import annotations

import glob
import os
import signal
import threading
import time

import numpy as np
import pytest

from tasks.errors import DeviceLost
from tests.helpers import ModelStub
from workers.engine import EXIT_DEVICE_LOST, EXIT_LOAD_FAILED, EngineCore
from workers.engine_client import ProcessEngine, _QueueInbox
from workers.protocol import CancelBatch, Done, EngineConfig, LoadFailed, Ready, RunBatch, Started, Step, Stop
from workers.work import CompatKey, ImageWork

KEY = CompatKey("fake", 8, 8, 4, 7.5)


class StepModel(ModelStub):
    """Calls the step callback at each step; a test can act between steps."""

    name = "steps"

    def __init__(self, on_step_2=None, fail: Exception | None = None):
        self.on_step_2 = on_step_2
        self.fail = fail
        self.steps_run: list[int] = []

    def run(self, key, images, on_step=None):
        if self.fail:
            raise self.fail
        for step in range(1, key.steps + 1):
            self.steps_run.append(step)
            if step == 2 and self.on_step_2:
                self.on_step_2()
            if on_step and on_step(step, key.steps):
                break
        return np.full((len(images), key.height, key.width, 3), len(images), np.uint8)


def run_core(model, messages) -> tuple[int, list[object]]:
    inbox, sent = _QueueInbox(), []
    for message in messages:
        inbox.queue.put(message)
    inbox.queue.put(Stop())
    code = EngineCore(EngineConfig.one("fake"), inbox, sent.append, load=lambda config: model).run()
    return code, sent


def batch(batch_id: int, images: int = 1) -> RunBatch:
    return RunBatch(batch_id, KEY, tuple(ImageWork("p", None, i) for i in range(images)))


def test_batches_run_in_order_with_a_step_report_each():
    code, sent = run_core(StepModel(), [batch(1, 2), batch(2)])
    assert code == 0 and isinstance(sent[0], Ready)
    kinds = [(type(m).__name__, getattr(m, "batch_id", None)) for m in sent[1:]]
    assert kinds == [("Started", 1)] + [("Step", 1)] * 4 + [("Done", 1), ("Started", 2)] + [("Step", 2)] * 4 + [
        ("Done", 2)
    ]
    assert [m.step for m in sent if isinstance(m, Step) and m.batch_id == 1] == [1, 2, 3, 4]
    assert sent[6].images.shape == (2, 8, 8, 3) and not sent[6].canceled


def test_a_cancel_stops_the_running_batch_at_the_next_step_and_a_queued_one_never_starts():
    inbox_holder = {}
    model = StepModel(on_step_2=lambda: [inbox_holder["inbox"].queue.put(CancelBatch(i)) for i in (1, 2)])
    inbox, sent = _QueueInbox(), []
    inbox_holder["inbox"] = inbox
    for message in (batch(1), batch(2), Stop()):
        inbox.queue.put(message)
    EngineCore(EngineConfig.one("fake"), inbox, sent.append, load=lambda config: model).run()
    assert model.steps_run == [1, 2], "the call stopped at the step boundary after the cancel"
    done = [m for m in sent if isinstance(m, Done)]
    assert [(d.batch_id, d.canceled) for d in done] == [(1, True), (2, True)]
    assert [m.batch_id for m in sent if isinstance(m, Started)] == [1]


def test_a_device_error_ends_the_engine_so_a_fresh_one_can_start():
    code, sent = run_core(StepModel(fail=DeviceLost("CUDA error: illegal memory access")), [batch(1)])
    assert code == EXIT_DEVICE_LOST and not any(isinstance(m, Done) for m in sent)


def test_a_model_that_cannot_load_is_reported_and_the_engine_exits():
    inbox, sent = _QueueInbox(), []

    def load(config):
        raise FileNotFoundError("no model at /nowhere")

    assert EngineCore(EngineConfig.one("x"), inbox, sent.append, load=load).run() == EXIT_LOAD_FAILED
    assert isinstance(sent[0], LoadFailed) and "/nowhere" in sent[0].error


class Events:
    def __init__(self):
        self.done: dict[int, np.ndarray] = {}
        self.died: list[tuple[float, str]] = []
        self.changed = threading.Condition()

    def batch_started(self, batch_id):
        pass

    def batch_step(self, batch_id, step, total):
        pass

    def batch_done(self, batch_id, images, inference_s, canceled, shared_images=0.0):
        with self.changed:
            self.done[batch_id] = images
            self.changed.notify_all()

    def batch_failed(self, batch_id, error, out_of_memory, call_images=0):
        pass

    def engine_died(self, reason):
        with self.changed:
            self.died.append((time.monotonic(), reason))
            self.changed.notify_all()


def shm_blocks() -> set[str]:
    return set(glob.glob("/dev/shm/psm_*"))


@pytest.mark.timeout(120)
def test_the_process_engine_returns_images_through_shared_memory_and_reports_its_death_at_once():
    before = shm_blocks()
    events = Events()
    engine = ProcessEngine(EngineConfig.one("sim:a=0,b=0.5"))
    ready = engine.start(events, timeout_s=60)
    assert ready.pid != threading.get_native_id()
    key = CompatKey(ready.model_name, 16, 8, 2, 7.5)
    engine.submit(1, key, [ImageWork("a", None, 1), ImageWork("b", None, 2)])
    with events.changed:
        assert events.changed.wait_for(lambda: 1 in events.done, 30)
    images = events.done[1]
    assert images.shape == (2, 8, 16, 3) and images.dtype == np.uint8 and not np.array_equal(images[0], images[1])
    engine.submit(2, key, [ImageWork("c", None, 3)])
    time.sleep(0.1)  # inside the 0.5 s call
    os.kill(engine.pid, signal.SIGKILL)  # as the OOM killer would
    killed = time.monotonic()
    with events.changed:
        assert events.changed.wait_for(lambda: events.died, 10)
    noticed, reason = events.died[0]
    assert noticed - killed < 1.0 and "SIGKILL" in reason
    assert shm_blocks() <= before, "the blocks of the batch it died in are freed"
