"""The engine protocol at run time: a message outside it is never dropped. The engine fails
the batch it names, or exits for a new engine; the worker fails the batch it names, or
replaces the engine."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from tasks.errors import UnknownMessage
from tests.workers.test_engine import KEY, StepModel, batch, run_core
from workers.engine import EXIT_PROTOCOL_ERROR
from workers.engine_client import ProcessEngine
from workers.protocol import Done, EngineConfig, Failed, Ready, RunBatch, Started, Stop, from_engine, to_engine


@dataclass(frozen=True)
class Resize:
    """A message from a newer worker that this engine does not know."""

    batch_id: int
    width: int


@dataclass(frozen=True)
class Hello:
    """A message that names no batch."""


def test_each_direction_accepts_its_own_messages_and_refuses_the_others():
    """to_engine and from_engine pass their union's members through and refuse the rest."""
    assert to_engine(Stop()) == Stop()
    assert from_engine(Started(3)) == Started(3)
    with pytest.raises(UnknownMessage) as refused:
        to_engine(Started(3))
    assert refused.value.batch_id == 3 and "Started" in refused.value.message
    with pytest.raises(UnknownMessage) as refused:
        from_engine(RunBatch(4, KEY, ()))
    assert refused.value.batch_id == 4
    with pytest.raises(UnknownMessage) as refused:
        from_engine({"kind": "done"})
    assert refused.value.batch_id is None


def test_the_engine_fails_the_batch_an_unknown_message_names_and_runs_the_others():
    """A message outside the protocol that names a batch: that batch fails, the engine goes on."""
    code, sent = run_core(StepModel(), [batch(1), Resize(7, 64), batch(2)])
    assert code == 0
    failed = [m for m in sent if isinstance(m, Failed)]
    assert len(failed) == 1 and failed[0].batch_id == 7 and "Resize" in failed[0].error
    assert [m.batch_id for m in sent if isinstance(m, Done)] == [1, 2]


def test_the_engine_exits_for_a_new_one_after_an_unknown_message_that_names_no_batch():
    """It finishes the batches it was sent, then exits with the protocol error's code."""
    code, sent = run_core(StepModel(), [batch(1), Hello()])
    assert code == EXIT_PROTOCOL_ERROR
    assert [m.batch_id for m in sent if isinstance(m, Done)] == [1]


class Events:
    def __init__(self):
        self.failed: list[tuple[int, str]] = []
        self.done: list[int] = []

    def batch_started(self, batch_id):
        pass

    def batch_step(self, batch_id, step, total):
        pass

    def batch_done(self, batch_id, images, inference_s, canceled, shared_images=0.0):
        self.done.append(batch_id)

    def batch_failed(self, batch_id, error, out_of_memory, call_images=0):
        self.failed.append((batch_id, error))

    def engine_died(self, reason):
        pass

    def device_memory(self, allocated, reserved, peak):
        pass


class Process:
    killed = False

    def kill(self):
        self.killed = True


def test_the_worker_fails_the_batch_an_unknown_message_names():
    """An unknown message from the engine naming a batch in flight fails it (the runner retries it)."""
    engine, events, process = ProcessEngine(EngineConfig.one("sim:")), Events(), Process()
    engine.submit(5, KEY, [])
    engine._handle(Resize(5, 64), process, events)
    assert events.failed and events.failed[0][0] == 5 and "Resize" in events.failed[0][1]
    assert not process.killed and not engine._blocks, "the batch's shared memory is freed"


def test_the_worker_replaces_an_engine_that_sends_what_it_does_not_understand():
    """A message naming no batch in flight, or a second Ready, kills the engine: the reader then
    reports its death and the runner starts a new one."""
    engine, events = ProcessEngine(EngineConfig.one("sim:")), Events()
    for message in (Hello(), Ready("m", 1, 0.0, 0.0)):
        process = Process()
        engine._handle(message, process, events)
        assert process.killed and not events.failed


def test_a_known_message_reaches_the_runner():
    """Done with images in the message (the thread engine's way) is dispatched as it is."""
    engine, events = ProcessEngine(EngineConfig.one("sim:")), Events()
    engine._handle(Done(9, 0.1, images=np.zeros((1, 8, 8, 3), np.uint8)), Process(), events)
    assert events.done == [9]
