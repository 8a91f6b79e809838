"""The pure batcher, on a fake clock: when batches flush, what they hold, and who goes first."""

from __future__ import annotations

import pytest

from workers.batcher import SWAP_PATIENCE, Batcher, BatchPolicy, CostModel, LruMap, Request
from workers.work import BatchKey, CompatKey

SHAPE_A, SHAPE_B = CompatKey("m", 64, 64, 20, 7.5), CompatKey("m", 128, 64, 20, 7.5)
A, B = BatchKey("q", SHAPE_A), BatchKey("q", SHAPE_B)


def batcher(max_images=4, wait_s=0.1, kind="fixed") -> Batcher:
    return Batcher(BatchPolicy(max_batch_images=max_images, max_wait_s=wait_s, kind=kind))


def add(b: Batcher, key=A, images=1, at=0.0, deadline=None) -> Request:
    request = Request(key=key, images=images, arrival=at, deadline=deadline, payload=None)
    b.add(request)
    return request


def requests_of(decision) -> list[Request]:
    return [s.request for s in decision.batch.slices]


def test_nothing_waiting_means_sleep_until_the_next_add():
    decision = batcher().next_batch(0.0)
    assert decision.batch is None and decision.wake_at is None


def test_a_full_batch_flushes_at_once():
    b = batcher(max_images=4)
    jobs = [add(b, at=i * 0.001) for i in range(4)]
    decision = b.next_batch(0.004)
    assert requests_of(decision) == jobs and decision.batch.images == 4
    assert len(b) == 0


def test_a_partial_batch_waits_until_max_wait_after_its_oldest():
    b = batcher(max_images=4, wait_s=0.1)
    first = add(b, at=1.0)
    second = add(b, at=1.05)
    waiting = b.next_batch(1.06)
    assert waiting.batch is None and waiting.wake_at == pytest.approx(1.1)
    assert requests_of(b.next_batch(1.1)) == [first, second]


def test_max_wait_zero_never_waits():
    b = batcher(wait_s=0)
    only = add(b, at=5.0)
    assert requests_of(b.next_batch(5.0)) == [only]


def test_keys_never_mix_and_the_oldest_key_goes_first():
    b = batcher(max_images=4, wait_s=0)
    a1 = add(b, A, at=0.0)
    b1 = add(b, B, at=0.1)
    a2 = add(b, A, at=0.2)
    b2 = add(b, B, at=0.3)
    first, second = b.next_batch(1.0), b.next_batch(1.0)
    assert (first.batch.key, requests_of(first)) == (A, [a1, a2])
    assert (second.batch.key, requests_of(second)) == (B, [b1, b2])


def test_a_busy_key_does_not_starve_an_older_one():
    b = batcher(max_images=2, wait_s=0)
    lonely = add(b, B, at=0.0)
    for i in range(6):
        add(b, A, at=0.1 + i * 0.01)
    assert requests_of(b.next_batch(1.0)) == [lonely]


def test_multi_image_jobs_count_their_images_and_smaller_ones_fill_the_gap():
    b = batcher(max_images=4, wait_s=0.1)
    three = add(b, images=3, at=0.0)
    two = add(b, images=2, at=0.01)
    one = add(b, images=1, at=0.02)
    decision = b.next_batch(0.03)
    assert requests_of(decision) == [three, one] and decision.batch.images == 4
    assert requests_of(b.next_batch(0.2)) == [two]


def test_a_batch_that_nothing_waiting_can_join_is_full():
    b = batcher(max_images=4, wait_s=10)
    three = add(b, images=3, at=0.0)
    add(b, images=2, at=0.01)
    assert requests_of(b.next_batch(0.02)) == [three]


def test_a_job_larger_than_the_limit_is_cut_into_slices():
    b = batcher(max_images=4, wait_s=0)
    big = add(b, images=10, at=0.0)
    small = add(b, images=1, at=0.1)
    layout = [[(s.request, s.start, s.count) for s in b.next_batch(1.0).batch.slices] for _ in range(3)]
    assert layout == [[(big, 0, 4)], [(big, 4, 4)], [(big, 8, 2), (small, 0, 1)]]
    assert b.next_batch(1.0).batch is None


def test_a_deadline_flushes_early_enough_for_the_predicted_batch_time():
    b = batcher(max_images=8, wait_s=1.0)
    b.cost_model.observe(SHAPE_A, 1, 0.2)
    add(b, at=0.0, deadline=0.5)
    waiting = b.next_batch(0.0)
    assert waiting.batch is None and waiting.wake_at == pytest.approx(0.3)
    assert b.next_batch(0.3).batch is not None


def test_without_a_deadline_the_same_batch_waits_the_full_max_wait():
    b = batcher(max_images=8, wait_s=1.0)
    b.cost_model.observe(SHAPE_A, 1, 0.2)
    add(b, at=0.0)
    assert b.next_batch(0.0).wake_at == pytest.approx(1.0)


def test_batch_of_one_path():
    b = batcher(max_images=1, wait_s=1.0)
    first, second = add(b, at=0.0), add(b, at=0.0)
    assert requests_of(b.next_batch(0.0)) == [first]
    assert requests_of(b.next_batch(0.0)) == [second]


def test_a_failed_batch_can_be_requeued_in_its_original_order():
    b = batcher(max_images=2, wait_s=0)
    first, second, third = (add(b, at=i * 0.1) for i in range(3))
    batch = b.next_batch(1.0).batch
    b.requeue(list(batch.slices))
    assert requests_of(b.next_batch(1.0)) == [first, second]
    assert requests_of(b.next_batch(1.0)) == [third]


def test_a_lowered_limit_applies_to_the_next_batches_of_that_key():
    b = batcher(max_images=4, wait_s=0)
    b.lower_limit(A, 2)
    for i in range(4):
        add(b, at=i * 0.01)
    assert b.next_batch(1.0).batch.images == 2


# -- the cost model and the adaptive policy ---------------------------------------------


def test_the_cost_model_fits_a_line_through_batch_times():
    model = CostModel()
    for n in (1, 2, 4, 8):
        model.observe(SHAPE_A, n, 0.1 * n + 0.25)
    a, b = model.coefficients(SHAPE_A)
    assert a == pytest.approx(0.1) and b == pytest.approx(0.25)
    assert model.predict(SHAPE_A, 6) == pytest.approx(0.85)
    assert model.predict(SHAPE_B, 1) is None


def adaptive(max_images=8, wait_s=1.0) -> Batcher:
    b = batcher(max_images=max_images, wait_s=wait_s, kind="adaptive")
    for n in (1, 8):  # the reference workload: 340 ms at batch 1, 1.1 s at batch 8
        b.cost_model.observe(SHAPE_A, n, {1: 0.34, 8: 1.1}[n])
    return b


def test_adaptive_starts_a_lone_request_at_once_on_an_idle_model():
    b = adaptive()
    only = add(b, at=100.0)
    assert requests_of(b.next_batch(100.0)) == [only]


def test_adaptive_runs_at_once_when_arrivals_are_sparse_compared_with_the_call_cost():
    b = adaptive()
    add(b, at=0.0)  # one image a second: waiting 1 s would cost more than b = 0.23 s
    b.next_batch(0.0)
    only = add(b, at=1.0)
    assert requests_of(b.next_batch(1.0)) == [only]


def busy_history(b: Batcher, until: float) -> None:
    """Ten images a second up to ``until``, all already served."""
    for i in range(int(until * 10)):
        add(b, at=i * 0.1)
    while b.next_batch(until + b.policy.max_wait_s).batch is not None:
        pass
    assert len(b) == 0


def test_adaptive_waits_for_company_while_arrivals_are_dense():
    b = adaptive(wait_s=1.0)
    busy_history(b, until=2.0)  # 10 images/s: a gap of 0.1 s, against b = 0.23 s
    head = add(b, at=2.0)
    waiting = b.next_batch(2.0)
    assert waiting.batch is None and waiting.wake_at == pytest.approx(2.1, abs=0.01)
    second = add(b, at=2.05)
    assert b.next_batch(2.06).batch is None  # 2 images x 0.1 s < 0.23 s: one more
    third = add(b, at=2.1)
    assert requests_of(b.next_batch(2.11)) == [head, second, third]  # 3 x 0.1 s >= 0.23 s


def test_adaptive_stops_waiting_when_the_expected_arrival_does_not_come():
    b = adaptive(wait_s=1.0)
    busy_history(b, until=2.0)
    head = add(b, at=2.0)
    assert requests_of(b.next_batch(2.11)) == [head]


def test_adaptive_never_waits_past_max_wait():
    b = adaptive(wait_s=0.05)
    busy_history(b, until=2.0)
    add(b, at=2.0)
    assert b.next_batch(2.0).wake_at <= 2.05


def test_policies_validate_their_limits():
    with pytest.raises(ValueError):
        BatchPolicy(max_batch_images=0)
    with pytest.raises(ValueError):
        BatchPolicy(max_wait_s=-1)


# -- while the model is busy, and per-key state ----------------------------------------


def test_a_partial_batch_is_held_while_the_model_is_busy_and_newcomers_join_it():
    b = batcher(max_images=4, wait_s=0)
    first = add(b, at=0.0)
    held = b.next_batch(0.0, not_before=0.5)
    assert held.batch is None and held.wake_at == pytest.approx(0.5)
    second = add(b, at=0.3)
    assert requests_of(b.next_batch(0.5, not_before=0.5)) == [first, second]


def test_a_full_batch_is_taken_at_once_even_while_the_model_is_busy():
    b = batcher(max_images=2, wait_s=0)
    jobs = [add(b, at=0.0), add(b, at=0.0)]
    assert requests_of(b.next_batch(0.0, not_before=0.5)) == jobs


def test_an_isolated_job_never_shares_a_batch_and_its_queue_keeps_its_policy():
    policies = {"fast": BatchPolicy(max_batch_images=2, max_wait_s=0), "bulk": BatchPolicy(8, max_wait_s=10)}
    b = Batcher(BatchPolicy(), policy_of=policies.__getitem__)
    alone = BatchKey("fast", SHAPE_A, alone="job-1")
    isolated = add(b, alone, at=0.0)
    add(b, BatchKey("fast", SHAPE_A), at=0.0)
    assert requests_of(b.next_batch(0.0)) == [isolated]
    assert b.policy_of(alone) == policies["fast"]


def test_a_lowered_limit_follows_the_shape_across_queues():
    b = Batcher(BatchPolicy(max_batch_images=8, max_wait_s=0))
    b.lower_limit(BatchKey("one", SHAPE_A), 2)
    assert b.limit(BatchKey("other", SHAPE_A, alone="j")) == 2 and b.limit(BatchKey("one", SHAPE_B)) == 8


def test_isolated_jobs_add_no_per_key_state():
    b = batcher(max_images=1, wait_s=0)
    for i in range(50):
        add(b, BatchKey("q", SHAPE_A, alone=f"job-{i}"), at=i * 0.01)
    assert len(b.arrivals._arrivals) == 1


def test_per_key_maps_are_bounded_least_recently_used_first():
    lru = LruMap(list, maxsize=3)
    for key in "abcd":
        lru.setdefault(key)
    assert len(lru) == 3 and lru.get("a") is None and lru.get("d") == []


# -- a worker serving several models: swap only when the other model has waited long enough
MODEL_X, MODEL_Y = BatchKey("q", CompatKey("x", 64, 64, 20, 7.5)), BatchKey("q", CompatKey("y", 64, 64, 20, 7.5))


def test_a_loaded_model_s_jobs_go_first_until_the_other_model_waited_its_patience():
    """Loading y costs 1 s: its job, older than x's, waits while x's run, until it has
    waited SWAP_PATIENCE loads; then y's turn comes even though x's keep arriving."""
    b = batcher(max_images=1, wait_s=0)
    b.model_loaded("y", 1.0)
    old_y = add(b, key=MODEL_Y, at=0.0)
    x_jobs = [add(b, key=MODEL_X, at=0.1 + i) for i in range(8)]
    decision = b.next_batch(0.2, resident={"x"})
    assert requests_of(decision) == [x_jobs[0]]
    decision = b.next_batch(SWAP_PATIENCE * 1.0 - 0.01, resident={"x"})
    assert requests_of(decision) == [x_jobs[1]]
    decision = b.next_batch(SWAP_PATIENCE * 1.0, resident={"x"})
    assert requests_of(decision) == [old_y]


def test_a_model_alone_in_waiting_is_loaded_once_the_loaded_one_has_gone_quiet():
    """y (1 s to load) waits while x's requests keep coming, even in a moment when none of
    x's is waiting; once x has sent nothing for one swap time, y is loaded. Both loaded:
    oldest first."""
    b = batcher(max_images=1, wait_s=0)
    b.model_loaded("y", 1.0)
    b.next_batch(0.0)
    x = add(b, key=MODEL_X, at=0.0)
    y = add(b, key=MODEL_Y, at=0.1)
    assert requests_of(b.next_batch(0.2, resident={"x"})) == [x]
    decision = b.next_batch(0.5, resident={"x"})
    assert decision.batch is None and decision.wake_at == pytest.approx(1.0), "x may still come: wait a swap time"
    assert requests_of(b.next_batch(1.0, resident={"x"})) == [y]
    y, x = add(b, key=MODEL_Y, at=2.0), add(b, key=MODEL_X, at=2.1)
    assert requests_of(b.next_batch(2.2, resident={"x", "y"})) == [y]
    assert requests_of(b.next_batch(2.3, resident={"x", "y"})) == [x]


def test_a_waiting_loaded_batch_wakes_the_dispatcher_when_the_swap_is_due():
    """x's batch waits to fill (max_wait 5 s); the dispatcher is woken when y's patience
    runs out, not later."""
    b = batcher(max_images=4, wait_s=5.0)
    b.model_loaded("y", 0.5)
    add(b, key=MODEL_Y, at=0.0)
    add(b, key=MODEL_X, at=0.1)
    decision = b.next_batch(0.2, resident={"x"})
    assert decision.batch is None and decision.wake_at == pytest.approx(SWAP_PATIENCE * 0.5)
    assert b.swap_cost("never-loaded") == 0.5, "a model never loaded is expected to cost the dearest seen"


# -- step-level batching -------------------------------------------------------------------
def stepwise(max_images=4, wait_s=1.0) -> Batcher:
    return Batcher(BatchPolicy(max_batch_images=max_images, max_wait_s=wait_s, batching="step"))


def test_a_step_level_batch_goes_at_once_however_long_its_wait_and_however_busy_the_model():
    b = stepwise(wait_s=10)
    job = add(b, at=0.0)
    assert b.joins(A) and requests_of(b.next_batch(0.0, not_before=5.0)) == [job]


def test_a_step_level_batch_takes_only_the_room_the_running_images_leave():
    b = stepwise(max_images=4)
    jobs = [add(b, at=0.0), add(b, images=2, at=0.1), add(b, at=0.2)]
    assert requests_of(b.next_batch(1.0, running=1)) == jobs[:2], "3 of 4 places were free"
    assert b.next_batch(1.0, running=4).batch is None, "no room: it waits for a slot to leave"
    assert requests_of(b.next_batch(1.0, running=3)) == jobs[2:]


def test_a_step_level_job_too_large_for_the_room_is_not_overtaken_by_smaller_ones():
    b = stepwise(max_images=4)
    large, small = add(b, images=3, at=0.0), add(b, at=0.1)
    assert b.next_batch(1.0, running=2).batch is None
    assert requests_of(b.next_batch(1.0, running=0)) == [large, small]


def test_step_level_batches_wait_while_none_may_join_and_calls_while_none_may_go():
    b = stepwise()
    add(b, at=0.0)
    assert b.next_batch(1.0, running=None).batch is None
    calls = batcher(wait_s=0)
    add(calls, at=0.0)
    assert calls.next_batch(1.0, calls=False).batch is None and calls.next_batch(1.0).batch is not None


def test_auto_batching_joins_as_the_engine_says_each_loaded_model_runs_best():
    from tasks.settings import QueuePolicy, Settings
    from workers.celery import batch_policy

    settings = Settings(queue_policies={"q": QueuePolicy(batching="request")})
    assert batch_policy(settings, "fleet.interactive").batching == "auto", "the default"
    assert batch_policy(settings, "q").batching == "request", "a queue's own"
    b = Batcher(BatchPolicy(batching="auto"))
    assert not b.joins(A), "request-level until the engine has loaded the model and said"
    b.model_loaded("m", 1.0, "step")
    b.model_loaded("n", 1.0, "request")
    assert b.joins(A) and not b.joins(BatchKey("q", CompatKey("n", 64, 64, 20, 7.5)))
    assert not b.joins(BatchKey("q", SHAPE_A, alone="job-1"))
    fixed = Batcher(BatchPolicy(batching="request"))
    fixed.model_loaded("m", 1.0, "step")
    assert not fixed.joins(A), "a queue set to request-level stays so"


def test_a_job_isolated_after_a_crash_never_joins_others():
    b = stepwise()
    alone = BatchKey("q", SHAPE_A, alone="job-1")
    assert not b.joins(alone) and b.joins(A)


def test_joining_keys_differ_only_in_steps_and_guidance():
    base = CompatKey("m", 64, 64, 20, 7.5, "DDIMScheduler", (("bold", 1.0),))
    assert base.joins(CompatKey("m", 64, 64, 40, 1.0, "DDIMScheduler", (("bold", 1.0),)))
    for other in (
        CompatKey("n", 64, 64, 20, 7.5, "DDIMScheduler", (("bold", 1.0),)),
        CompatKey("m", 128, 64, 20, 7.5, "DDIMScheduler", (("bold", 1.0),)),
        CompatKey("m", 64, 64, 20, 7.5, None, (("bold", 1.0),)),
        CompatKey("m", 64, 64, 20, 7.5, "DDIMScheduler", (("bold", 0.5),)),
    ):
        assert not base.joins(other)
