"""The runner and the engine loop, on an in-process engine with a fake model: one thread
loads, warms and runs the model; jobs batch together; the next batch waits in the engine
while one runs; a failing batch is split so only the bad job fails; out-of-memory halves
the batch."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tasks.errors import JobCanceled, PipelineError
from tasks.settings import WarmShape
from tests.helpers import FakeModel, fake_engine
from workers.batcher import Batcher, BatchPolicy
from workers.engine_client import ThreadEngine
from workers.protocol import EngineConfig
from workers.runner import ModelRunner
from workers.work import BatchKey, CompatKey, ImageWork

KEY = CompatKey("fake", 8, 8, 1, 1.0)


def make_runner(model: FakeModel, max_images=8, wait_s=0.05) -> ModelRunner:
    runner = ModelRunner(fake_engine(model), Batcher(BatchPolicy(max_images, wait_s)))
    runner.start(timeout_s=5)
    return runner


def red(result, index=0) -> int:
    return int(result.images[index][0, 0, 0])


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
    assert [red(r) for r in results] == list(range(8))
    assert len({r.batch_id for r in results}) == 2 and {r.batch_images for r in results} == {4}


def test_a_failing_batch_is_split_so_only_the_bad_job_fails():
    model = FakeModel(fail_on="poison")
    runner = make_runner(model, max_images=8, wait_s=0.5)
    names = ["a", "b", "poison", "c", "d"]
    futures = {name: runner.submit(KEY, work(name)) for name in names}
    with pytest.raises(PipelineError, match="bad prompt"):
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
    assert len(result.images) == 4 and [red(result, i) for i in range(4)] == [0, 1, 2, 3]


def test_stop_finishes_the_work_already_queued():
    model = FakeModel(call_s=0.05)
    runner = make_runner(model, max_images=2, wait_s=10)
    futures = [runner.submit(KEY, work(f"p{i}")) for i in range(3)]
    runner.stop()
    assert all(f.done() and not f.exception() for f in futures)


def test_a_model_that_cannot_load_fails_start():
    def load(config):
        raise FileNotFoundError("no model here")

    runner = ModelRunner(ThreadEngine(EngineConfig.one("broken"), load=load), Batcher(BatchPolicy()))
    with pytest.raises(RuntimeError, match="no model here"):
        runner.start(timeout_s=5)


def test_the_engine_warms_each_configured_shape_before_it_is_ready():
    model = FakeModel()
    shape = WarmShape(16, 24, (1, 8))
    runner = ModelRunner(
        ThreadEngine(EngineConfig.one("fake", warm=(shape,)), load=lambda c: model), Batcher(BatchPolicy())
    )
    runner.start(timeout_s=5)
    runner.stop()
    assert model.warmed == shape


class ScriptedEngine:
    """An engine the test drives by hand: it records what the runner sends and the test
    plays the engine's events back."""

    def __init__(self, fail_restart: bool = False):
        self.sent: list[tuple[int, list[str]]] = []
        self.joins: dict[int, object] = {}
        self.starts = 0
        self.fail_restart = fail_restart
        self.events = None
        self.sent_event = threading.Condition()

    def start(self, events, timeout_s=None):
        from tasks.errors import EngineStartFailed
        from workers.protocol import Ready

        self.starts += 1
        if self.starts > 1 and self.fail_restart:
            raise EngineStartFailed("the device is gone")
        self.events = events
        return Ready("scripted", 1000 + self.starts, 0.0, 0.0)

    def submit(self, batch_id, key, work, join=None):
        with self.sent_event:
            self.sent.append((batch_id, [w.prompt for w in work]))
            self.joins[batch_id] = join
            self.sent_event.notify_all()

    def cancel(self, batch_id):
        pass

    def stop(self, timeout_s=60):
        pass

    def wait_sent(self, count: int) -> list[tuple[int, list[str]]]:
        with self.sent_event:
            assert self.sent_event.wait_for(lambda: len(self.sent) >= count, 5), f"only {self.sent} sent"
        return self.sent

    def finish(self, batch_id: int, images: int) -> None:
        self.events.batch_done(batch_id, np.zeros((images, 8, 8, 3), np.uint8), 0.01, False)


def scripted_runner(engine, max_images=2, **kwargs) -> ModelRunner:
    runner = ModelRunner(engine, Batcher(BatchPolicy(max_images, 0)), **kwargs)
    runner.start(timeout_s=5)
    return runner


def test_the_next_batch_is_in_the_engine_before_the_running_one_ends():
    engine = ScriptedEngine()
    runner = scripted_runner(engine)
    futures = [runner.submit(KEY, work(f"p{i}")) for i in range(6)]
    first, second = engine.wait_sent(2)
    engine.events.batch_started(first[0])
    time.sleep(0.1)
    assert len(engine.sent) == 2, "no more than the running batch and the next one are in the engine"
    engine.finish(first[0], 2)
    third = engine.wait_sent(3)[2]
    assert [first[1], second[1], third[1]] == [["p0", "p1"], ["p2", "p3"], ["p4", "p5"]]
    for batch_id, _ in engine.sent[1:]:
        engine.events.batch_started(batch_id)
        engine.finish(batch_id, 2)
    assert all(len(f.result(5).images) == 1 for f in futures)
    runner.stop()


def test_when_the_engine_dies_its_running_jobs_crash_and_its_queued_jobs_run_on_the_next_engine():
    from tasks.errors import EngineCrashed

    engine = ScriptedEngine()
    counted: list[list[object]] = []
    runner = scripted_runner(engine, on_batch_start=counted.append)
    running = [runner.submit(KEY, work(f"r{i}"), job_id=f"r{i}") for i in range(2)]
    queued = [runner.submit(KEY, work(f"q{i}"), job_id=f"q{i}") for i in range(2)]
    first, _ = engine.wait_sent(2)
    engine.events.batch_started(first[0])
    engine.events.engine_died("the engine was killed by SIGKILL")
    for future in running:
        with pytest.raises(EngineCrashed, match="SIGKILL"):
            future.result(5)
    resent = engine.wait_sent(3)[2]
    assert engine.starts == 2 and resent[1] == ["q0", "q1"] and runner.restarts == 1
    assert counted == [["r0", "r1"]], "only the batch that was running counts a crash"
    engine.events.batch_started(resent[0])
    engine.finish(resent[0], 2)
    assert all(len(f.result(5).images) == 1 for f in queued)
    runner.stop()


def test_an_engine_that_cannot_restart_releases_the_waiting_jobs_and_stops_the_worker():
    from workers.runner import JobReleased

    engine = ScriptedEngine(fail_restart=True)
    lost: list[str] = []
    runner = scripted_runner(engine, max_images=1, depth=1, on_engine_lost=lost.append)
    first = runner.submit(KEY, work("a"))
    engine.wait_sent(1)
    waiting = runner.submit(KEY, work("b"))
    engine.events.batch_started(1)
    engine.events.engine_died("the engine exited after a device error")
    with pytest.raises(JobReleased):
        waiting.result(5)
    assert first.exception(5) is not None
    assert lost == ["the device is gone"]


def test_a_canceled_job_waiting_for_the_engine_never_runs():
    model = FakeModel(call_s=0.3)
    runner = make_runner(model, wait_s=0)
    running = runner.submit(KEY, work("first"))
    waiting = runner.submit(CompatKey("fake", 16, 8, 1, 1.0), work("second"))  # queued behind it
    assert runner.cancel("nobody", "x") is False  # no such job
    tagged = runner.submit(CompatKey("fake", 24, 8, 1, 1.0), work("third"), job_id="job-3")
    assert runner.cancel("job-3", "canceled by its client")
    with pytest.raises(JobCanceled):
        tagged.result(5)
    running.result(5), waiting.result(5)
    runner.stop()
    assert ["third"] not in model.calls


def test_a_running_job_alone_stops_at_its_next_step():
    model = FakeModel(call_s=2.0)
    runner = make_runner(model)
    future = runner.submit(CompatKey("fake", 8, 8, 20, 1.0), work("long"), job_id="job-1")
    while model.steps_run == 0:
        time.sleep(0.01)
    assert runner.cancel("job-1", "canceled by its client")
    with pytest.raises(JobCanceled):
        future.result(5)
    runner.stop()
    assert model.steps_run < 20  # the engine stopped the call early


def test_a_job_canceled_in_a_shared_batch_leaves_its_neighbour_its_images():
    model = FakeModel(call_s=0.5)
    runner = make_runner(model, wait_s=0.2)
    key = CompatKey("fake", 8, 8, 10, 1.0)
    stays = runner.submit(key, work("stays", seed=5), job_id="job-a")
    leaves = runner.submit(key, work("leaves", seed=6), job_id="job-b")
    while not model.calls:
        time.sleep(0.01)
    assert runner.cancel("job-b", "canceled by its client")
    with pytest.raises(JobCanceled):
        leaves.result(5)
    result = stays.result(5)
    runner.stop()
    assert model.calls == [["stays", "leaves"]] and result.batch_images == 2 and red(result) == 5


# -- step-level batching ---------------------------------------------------------------------
def test_step_level_batches_go_at_once_while_there_is_room_and_the_next_when_a_slot_leaves():
    from workers.protocol import Join

    engine = ScriptedEngine()
    runner = ModelRunner(engine, Batcher(BatchPolicy(2, max_wait_s=10, batching="step")))
    runner.start(timeout_s=5)
    key = CompatKey("fake", 8, 8, 4, 1.0)
    first = runner.submit(key, work("a"))
    ((a, _),) = engine.wait_sent(1)
    assert engine.joins[a] == Join(2), "sent at once, despite its 10 s max_wait"
    engine.events.batch_started(a)
    runner.submit(key, work("b"))
    b = engine.wait_sent(2)[1][0]
    engine.events.batch_started(b)
    runner.submit(key, work("c"))
    time.sleep(0.1)
    assert len(engine.sent) == 2, "no room: a and b fill the 2 places"
    engine.events.batch_step(a, 3, 4)
    assert engine.wait_sent(3)[2][1] == ["c"], "a leaves at the next boundary: c is sent to take its place"
    engine.finish(a, 1)
    assert len(first.result(5).images) == 1
    for batch_id in (b, engine.sent[2][0]):
        engine.events.batch_started(batch_id)
        engine.finish(batch_id, 1)
    runner.stop()


def long_then_short(model, batching: str):
    """A 30-step job, then, once it runs, a 2-step one: their results, in the order they ended."""
    steps: list[int] = []
    finished: dict[str, object] = {}
    runner = ModelRunner(
        fake_engine(model),
        Batcher(BatchPolicy(8, 0, batching=batching)),
        on_batch_step=lambda job_ids, step, total: steps.append(step),
    )
    runner.start(timeout_s=5)
    long = runner.submit(CompatKey("sim", 8, 8, 30, 1.0), work("long"), job_id="long")
    long.add_done_callback(lambda future: finished.setdefault("long", future.result()))
    while not steps:
        time.sleep(0.005)
    short = runner.submit(CompatKey("sim", 8, 8, 2, 1.0), work("short", seed=3), job_id="short")
    short.add_done_callback(lambda future: finished.setdefault("short", future.result()))
    for future in (short, long):
        future.result(10)
    runner.stop()
    return finished


def test_a_short_job_joins_a_long_running_one_and_finishes_first():
    from workers.sim import SimModel, SimProfile

    finished = long_then_short(SimModel(SimProfile(a=0.0, b=0.6, steps=30), "sim"), "step")
    assert list(finished) == ["short", "long"], "it did not wait for the long job's call to end"
    short, long = finished["short"], finished["long"]
    assert short.batch_id != long.batch_id
    assert short.batch_images == 2, "its steps ran beside the long job's: 2 images a call"


def test_auto_batching_runs_step_level_where_the_engine_says_the_model_runs_best_so():
    """The engine's Ready carries ``Model.batching``: a model that runs best step-level (an
    eager GPU pipeline; here a simulation told so) has a short job join a long one; one
    that runs best request-level has it wait for the long job's call."""
    from workers.sim import SimModel, SimProfile

    class LaunchBound(SimModel):
        batching = "step"

    profile = SimProfile(a=0.0, b=0.3, steps=30)
    joined = long_then_short(LaunchBound(profile, "sim"), "auto")
    assert list(joined) == ["short", "long"] and joined["short"].batch_images == 2
    waited = long_then_short(SimModel(profile, "sim"), "auto")
    assert list(waited) == ["long", "short"] and waited["short"].batch_images == 1


def test_a_step_level_job_canceled_mid_run_leaves_at_the_next_step_and_its_neighbour_runs_on():
    from workers.sim import SimModel, SimProfile

    model = SimModel(SimProfile(a=0.0, b=0.6, steps=30), "sim")
    steps: dict[str, int] = {}
    runner = ModelRunner(
        fake_engine(model),
        Batcher(BatchPolicy(8, 0, batching="step")),
        on_batch_step=lambda job_ids, step, total: steps.update(dict.fromkeys(job_ids, step)),
    )
    runner.start(timeout_s=5)
    key = CompatKey("sim", 8, 8, 30, 1.0)
    stays = runner.submit(key, work("stays", seed=1), job_id="stays")
    while "stays" not in steps:  # running: the next job is a batch of its own, joining it
        time.sleep(0.005)
    leaves = runner.submit(key, work("leaves", seed=2), job_id="leaves")
    while steps.get("leaves", 0) < 3:
        time.sleep(0.005)
    assert runner.cancel("leaves", "canceled by its client")
    with pytest.raises(JobCanceled):
        leaves.result(5)
    assert len(stays.result(10).images) == 1
    runner.stop()
    assert steps["stays"] == 30 and steps["leaves"] < 30, "the canceled job's steps stopped, its neighbour's did not"


def test_step_level_batches_that_failed_in_a_shared_call_are_retried_each_as_a_call_of_its_own():
    engine = ScriptedEngine()
    runner = ModelRunner(engine, Batcher(BatchPolicy(8, 0, batching="step")))
    runner.start(timeout_s=5)
    key = CompatKey("fake", 8, 8, 4, 1.0)
    first = runner.submit(key, work("a"), job_id="a")
    a = engine.wait_sent(1)[0][0]
    engine.events.batch_started(a)
    second = runner.submit(key, work("b"), job_id="b")
    b = engine.wait_sent(2)[1][0]
    engine.events.batch_started(b)
    for batch_id in (a, b):
        engine.events.batch_failed(batch_id, "out of memory", True, 2)
    retried = engine.wait_sent(3)[2][0]
    assert engine.joins[retried] is None, "a call of its own, joining nothing"
    engine.events.batch_started(retried)
    engine.finish(retried, 1)
    retried = engine.wait_sent(4)[3][0]
    assert engine.joins[retried] is None
    engine.events.batch_started(retried)
    engine.finish(retried, 1)
    assert len(first.result(5).images) == len(second.result(5).images) == 1, "neither failed for the shared call"
    assert runner._batcher.limit(BatchKey("", key)) == 1, "out of memory at 2 images: groups of this shape hold 1"
    runner.stop()
