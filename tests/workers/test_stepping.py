"""Step-level batching in the engine loop (``workers.stepping``), on a fake stepper: a
batch joins the running ones at the next step boundary, each keeps its own step count and
leaves when its own steps are done; what cannot join waits, in order; a cancel, a failed
admission and a failed step each touch only what they must."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.errors import DeviceLost
from tests.helpers import ModelStub
from workers.engine import EXIT_DEVICE_LOST, EngineCore
from workers.engine_client import _QueueInbox
from workers.protocol import CancelBatch, Done, EngineConfig, Failed, Join, RunBatch, Started, Step, Stop
from workers.work import CompatKey, ImageWork

KEY = CompatKey("fake", 8, 8, 4, 7.5)


@dataclass(eq=False)
class Counted:
    key: CompatKey
    images: int
    step_index: int = 0

    @property
    def steps(self) -> int:
        return self.key.steps

    @property
    def done(self) -> bool:
        return self.step_index >= self.steps


class Stepping(ModelStub):
    """A model with a step-level loop: records the batch sizes of each step; ``during``
    maps a step number (counted over the engine's life) to what to do inside it."""

    name = "fake"

    def __init__(self, during=None, fail_step: int | None = None, steps: bool = True):
        self.during = during or {}
        self.fail_step = fail_step
        self.has_stepper = steps
        self.steps_run: list[list[int]] = []
        self.calls: list[int] = []
        self.admissions: list[list[int]] = []
        self.decodes: list[list[int]] = []

    def run(self, key, images, on_step=None):
        self.calls.append(len(images))
        for step in range(1, key.steps + 1):
            if on_step and on_step(step, key.steps):
                break
        return np.zeros((len(images), key.height, key.width, 3), np.uint8)

    def stepper(self, key):
        return self if self.has_stepper else None

    def admit(self, batches):
        self.admissions.append([len(images) for _, images in batches])
        if any(w.prompt == "bad" for _, images in batches for w in images):
            raise ValueError("the encoder refused the prompt")
        return [Counted(key, len(images)) for key, images in batches]

    def step(self, running):
        self.steps_run.append([s.images for s in running])
        number = len(self.steps_run)
        self.during.get(number, lambda: None)()
        if number == self.fail_step:
            raise RuntimeError("the step failed")
        for slots in running:
            slots.step_index += 1

    def decode(self, finished):
        self.decodes.append([slots.images for slots in finished])
        return [np.full((s.images, s.key.height, s.key.width, 3), s.key.steps, np.uint8) for s in finished]


def joining(batch_id: int, images: int = 1, key: CompatKey = KEY, limit: int = 8, prompt: str = "p") -> RunBatch:
    return RunBatch(batch_id, key, tuple(ImageWork(prompt, None, i) for i in range(images)), join=Join(limit))


def run_engine(model: Stepping, first: list[object], later: dict[int, list[object]] | None = None) -> list[object]:
    """Runs the engine on ``first``; ``later`` puts messages in its inbox during a step."""
    inbox, sent = _QueueInbox(), []
    for step, messages in (later or {}).items():
        model.during[step] = lambda messages=messages: [inbox.queue.put(m) for m in messages]
    for message in first:
        inbox.queue.put(message)
    if later:  # Stop only once the last of them is in
        last = max(later)
        put = model.during[last]
        model.during[last] = lambda: (put(), inbox.queue.put(Stop()))
    else:
        inbox.queue.put(Stop())
    EngineCore(EngineConfig.one("fake"), inbox, sent.append, load=lambda config: model).run()
    return sent[1:]


def events(sent, kind) -> list[int]:
    return [m.batch_id for m in sent if isinstance(m, kind)]


def steps_of(sent, batch_id) -> list[tuple[int, int]]:
    return [(m.step, m.total) for m in sent if isinstance(m, Step) and m.batch_id == batch_id]


def test_a_batch_joins_at_the_next_step_boundary_and_each_leaves_after_its_own_steps():
    model = Stepping()
    sent = run_engine(model, [joining(1, 2)], later={2: [joining(2, key=CompatKey("fake", 8, 8, 3, 1.0))]})
    assert model.steps_run == [[2], [2], [2, 1], [2, 1], [1]], "it joined after step 2 and ran on alone"
    assert steps_of(sent, 1) == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert steps_of(sent, 2) == [(1, 3), (2, 3), (3, 3)], "its own count, exact"
    assert events(sent, Done) == [1, 2] and events(sent, Started) == [1, 2]
    done = {m.batch_id: m for m in sent if isinstance(m, Done)}
    assert done[1].images.shape == (2, 8, 8, 3) and int(done[2].images[0, 0, 0, 0]) == 3
    assert done[1].shared_images == (2 + 2 + 3 + 3) / 4 and done[2].shared_images == (3 + 3 + 1) / 3
    assert sent.index(next(m for m in sent if isinstance(m, Started) and m.batch_id == 2)) < sent.index(done[1])


def test_what_cannot_join_waits_for_the_running_batches_and_so_does_everything_after_it():
    model = Stepping()
    wide, wide_longer = CompatKey("fake", 16, 8, 2, 7.5), CompatKey("fake", 16, 8, 3, 1.0)
    sent = run_engine(model, [joining(1)], later={1: [joining(2, key=wide), joining(3, key=wide_longer), joining(4)]})
    assert model.steps_run == [[1]] * 4 + [[1, 1]] * 2 + [[1]] * 1 + [[1]] * 4, (
        "2 waits for 1 to end, 3 joins 2 at once; 4 could have joined 1 but was sent after 2"
    )
    assert events(sent, Done) == [1, 2, 3, 4]


def test_a_batch_waits_for_room_and_a_request_level_batch_for_the_group_to_drain():
    model = Stepping()
    sent = run_engine(
        model,
        [joining(1, 2, limit=2)],
        later={1: [joining(2, limit=2)], 5: [RunBatch(3, KEY, (ImageWork("call", None, 0),))]},
    )
    assert model.steps_run == [[2]] * 4 + [[1]] * 4, "no room for 2 until 1 left"
    assert model.calls == [1] and events(sent, Done) == [1, 2, 3]


def test_a_canceled_batch_leaves_at_the_next_step_and_the_others_run_on():
    model = Stepping()
    sent = run_engine(model, [joining(1), joining(2)], later={2: [CancelBatch(1)]})
    assert model.steps_run == [[1, 1], [1, 1], [1], [1]]
    done = {m.batch_id: m for m in sent if isinstance(m, Done)}
    assert done[1].canceled and done[1].images is None and not done[2].canceled


def test_batches_joining_at_one_boundary_are_admitted_together_and_those_finishing_together_decoded_together():
    model = Stepping()
    sent = run_engine(model, [joining(1, 2)], later={1: [joining(2), joining(3, 3)]})
    assert model.admissions == [[2], [1, 3]] and model.decodes == [[2], [1, 3]]
    assert events(sent, Done) == [1, 2, 3]


def test_a_batch_that_cannot_be_admitted_fails_alone():
    model = Stepping()
    sent = run_engine(model, [joining(1)], later={1: [joining(2), joining(3, prompt="bad"), joining(4)]})
    failed = [m for m in sent if isinstance(m, Failed)]
    assert [f.batch_id for f in failed] == [3] and "refused" in failed[0].error
    assert model.admissions == [[1], [1, 1, 1], [1], [1], [1]], "together first, then one by one"
    assert events(sent, Done) == [1, 2, 4]


def test_a_failed_step_fails_every_batch_that_shared_it():
    model = Stepping(fail_step=2)
    sent = run_engine(model, [joining(1), joining(2)])
    assert events(sent, Failed) == [1, 2] and not events(sent, Done)
    assert {m.call_images for m in sent if isinstance(m, Failed)} == {2}, "each says the call held 2 images"


def test_a_device_error_in_a_step_ends_the_engine():
    def lost():
        raise DeviceLost("CUDA error: an illegal memory access was encountered")

    model = Stepping(during={2: lost})
    inbox, sent = _QueueInbox(), []
    for message in (joining(1), joining(2), Stop()):
        inbox.queue.put(message)
    code = EngineCore(EngineConfig.one("fake"), inbox, sent.append, load=lambda config: model).run()
    assert code == EXIT_DEVICE_LOST and not events(sent, Done)


def test_a_model_without_a_step_level_loop_runs_joining_batches_as_calls():
    model = Stepping(steps=False)
    sent = run_engine(model, [joining(1, 2), joining(2)])
    assert model.calls == [2, 1] and not model.steps_run and events(sent, Done) == [1, 2]
