"""The job as clients see it: the estimated start of a queued job."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from tasks.store import QueuePlace
from tasks.views import PlaceInLine

NOW = 1_800_000_000.0


def start(position: int, jobs_per_s: float, running: int, threads: int = 2) -> float | None:
    place = PlaceInLine.estimate(QueuePlace(position, jobs_per_s, running, threads), NOW)
    assert place.position == position
    return None if place.estimated_start_at is None else place.estimated_start_at.timestamp() - NOW


@pytest.mark.parametrize("jobs_per_s", [1 / 60, 2.0])
def test_the_next_job_of_an_idle_queue_starts_now_whatever_the_rate(jobs_per_s):
    """Position 0 with no job running starts now, not one average job time later."""
    assert start(0, jobs_per_s, running=0) == 0


def test_jobs_that_fit_the_free_threads_start_now_and_the_rest_wait_at_the_rate():
    """Free threads take the first jobs at once; each job after them waits 1/r more."""
    assert [start(p, 0.5, running=0, threads=2) for p in range(4)] == [0, 0, 2, 4]
    assert [start(p, 0.5, running=1, threads=2) for p in range(3)] == [0, 2, 4]


def test_a_busy_queue_waits_one_start_per_job_ahead_and_its_own():
    """No free thread: position p starts after p + 1 starts, at the measured rate."""
    assert [start(p, 0.25, running=2, threads=2) for p in range(3)] == [4, 8, 12]
    assert start(0, 0.25, running=5, threads=2) == 4  # more running than one worker's threads


def test_an_idle_worker_takes_the_next_job_now_even_before_it_finished_any():
    """A worker consuming the queue with free threads and no rate measured yet: start now."""
    assert start(0, 0.0, running=0, threads=2) == 0
    assert start(1, 0.0, running=1, threads=2) is None  # it must wait, and there is no rate to wait at


def test_without_a_worker_a_job_waits_at_the_rate_or_has_no_estimate():
    """No worker consumes the queue: no thread is free; the rate alone decides, if any."""
    assert start(0, 0.0, running=0, threads=0) is None
    assert start(0, 0.5, running=0, threads=0) == 2


def test_the_estimate_is_a_utc_time():
    """The start is an aware UTC datetime, as the API renders every time."""
    place = PlaceInLine.estimate(QueuePlace(0, 1.0, 0, 2), NOW)
    assert place.estimated_start_at == datetime.fromtimestamp(NOW, timezone.utc)
