"""A worker's presence: announced when it starts, renewed while it runs, gone when it stops."""

from __future__ import annotations

import time

from tasks.jobs import new_job_id
from tasks.keyspace import CONSUMER_THREADS_KEY, CONSUMERS_PREFIX
from workers.presence import LAPSE_INTERVALS, Presence


def test_a_worker_is_present_while_it_runs_and_gone_once_it_stops(store, redis_client):
    """start announces at once and the loop renews it; stop withdraws it from every queue."""
    queues = [f"presence-{new_job_id()}", f"presence-{new_job_id()}"]
    presence = Presence(store, "present@host", queues, threads=6, interval_s=0.05)
    presence.start()
    try:
        first = redis_client.zscore(CONSUMERS_PREFIX + queues[0], "present@host")
        assert first is not None and first > time.time()
        assert redis_client.hget(CONSUMER_THREADS_KEY, "present@host") == b"6"
        deadline = time.monotonic() + 10
        while redis_client.zscore(CONSUMERS_PREFIX + queues[0], "present@host") == first:
            assert time.monotonic() < deadline, "the presence was never renewed"
            time.sleep(0.01)
        lapses_at = redis_client.zscore(CONSUMERS_PREFIX + queues[1], "present@host")
        assert lapses_at <= time.time() + 0.05 * LAPSE_INTERVALS + 1
    finally:
        presence.stop()
    assert all(redis_client.zscore(CONSUMERS_PREFIX + q, "present@host") is None for q in queues)
    assert redis_client.hget(CONSUMER_THREADS_KEY, "present@host") is None
