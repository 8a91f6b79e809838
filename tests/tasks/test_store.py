"""Job records in real Redis: atomic, idempotent transitions and a TTL on every record."""

from __future__ import annotations

import time

import pytest

from tasks.jobs import BatchInfo, Job, JobState, JobUpdate, Timings, new_job_id, parse_request
from tasks.settings import Settings
from tasks.store import JobStore, QueuePlace


@pytest.fixture
def job(store):
    job = Job(
        id=new_job_id(),
        state=JobState.QUEUED,
        spec=parse_request({"prompt": "a", "seed": 1}, Settings()),
        created_at=1.0,
    )
    store.create(job, publish_by=job.created_at + 60)
    return job


def test_create_and_get(store, job):
    assert store.get(job.id) == job
    assert store.get(new_job_id()) is None


def test_records_expire_after_the_ttl(store, job, settings):
    assert 0 < store.ttl(job.id) <= settings.job_ttl_s


def test_running_counts_attempts_and_a_redelivery_is_a_second_attempt(store, job):
    assert store.transition(job.id, JobState.RUNNING, JobUpdate(worker="a")).applied
    assert store.transition(job.id, JobState.RUNNING, JobUpdate(worker="b")).applied
    record = store.get(job.id)
    assert (record.state, record.attempts, record.worker) == (JobState.RUNNING, 2, "b")


def test_a_finished_job_never_moves_again(store, job):
    store.transition(job.id, JobState.RUNNING)
    assert store.transition(job.id, JobState.SUCCEEDED, JobUpdate(error="")).applied
    for target in (JobState.RUNNING, JobState.FAILED, JobState.SUCCEEDED, JobState.QUEUED):
        result = store.transition(job.id, target, JobUpdate(error="late"))
        assert not result.applied and result.state is JobState.SUCCEEDED
    assert store.get(job.id).error == ""


def test_queued_cannot_jump_to_succeeded(store, job):
    result = store.transition(job.id, JobState.SUCCEEDED)
    assert not result.applied and result.state is JobState.QUEUED


def test_transition_of_a_missing_job_applies_nothing(store):
    result = store.transition(new_job_id(), JobState.RUNNING)
    assert not result.applied and result.state is None


def test_counters_never_create_a_record_for_a_job_that_is_not_there(store, redis_client):
    """Counting a crash or releasing a claim of an expired job leaves no id-less, TTL-less hash."""
    ghost = new_job_id()
    store.enter_model([ghost])
    store.release(ghost)
    assert not redis_client.exists(store.key(ghost))


def test_an_update_is_stored_typed_and_read_back_as_it_was_written(store, job):
    """Timestamps, keys, timings and the batch go in as values and come back equal."""
    update = JobUpdate(
        finished_at=1234.5,
        image_keys=[f"jobs/{job.id}/0.png"],
        timings=Timings(queue_wait_s=0.25, inference_s=1.5),
        batch=BatchInfo("7-3", 8),
    )
    store.transition(job.id, JobState.RUNNING)
    assert store.transition(job.id, JobState.SUCCEEDED, update).applied
    record = store.get(job.id)
    assert record.finished_at == 1234.5 and record.image_keys == update.image_keys
    assert record.timings == update.timings and record.batch == BatchInfo("7-3", 8)


def test_the_backlog_follows_a_job_from_queued_to_running_to_done(store):
    spec = parse_request({"prompt": "a", "seed": 1}, Settings())
    job = Job(id=new_job_id(), state=JobState.QUEUED, spec=spec, created_at=time.time(), queue="backlog-test")
    store.create(job, publish_by=job.created_at + 30)
    assert store.backlog(["backlog-test"]) == {"backlog-test": (1, 0)}
    store.transition(job.id, JobState.RUNNING)
    assert store.backlog(["backlog-test"]) == {"backlog-test": (0, 1)}
    store.transition(job.id, JobState.SUCCEEDED)
    assert store.backlog(["backlog-test"]) == {"backlog-test": (0, 0)}


def test_place_in_line_counts_the_queue_s_running_jobs_and_recent_throughput(store, redis_client):
    """place_in_line reads position, jobs finished per second lately and jobs running, per queue."""
    queue = f"place-{new_job_id()}"
    spec = parse_request({"prompt": "a", "seed": 1}, Settings())
    jobs = [
        Job(id=new_job_id(), state=JobState.QUEUED, spec=spec, created_at=time.time() + i, queue=queue)
        for i in range(3)
    ]
    for job in jobs:
        store.create(job, publish_by=job.created_at + 60)
    assert store.place_in_line(jobs[2]) == QueuePlace(2, 0.0, 0, 0)
    store.transition(jobs[0].id, JobState.RUNNING)
    assert store.place_in_line(jobs[2]) == QueuePlace(1, 0.0, 1, 0)
    store.transition(jobs[0].id, JobState.SUCCEEDED)
    place = store.place_in_line(jobs[2])
    assert place is not None and (place.position, place.running) == (1, 0)
    assert place.jobs_per_s == pytest.approx(1 / 120)
    store.transition(jobs[2].id, JobState.CANCELED)
    assert store.place_in_line(jobs[2]) is None, "not queued any more"


def test_the_threads_of_the_workers_announced_on_a_queue_count_until_they_lapse_or_withdraw(store):
    """A queue's threads: those of the workers that announced it and have not lapsed or withdrawn."""
    queue = f"announced-{new_job_id()}"
    spec = parse_request({"prompt": "a", "seed": 1}, Settings())
    job = Job(id=new_job_id(), state=JobState.QUEUED, spec=spec, created_at=time.time(), queue=queue)
    store.create(job, publish_by=job.created_at + 60)
    store.announce("w1@host", [queue, "elsewhere"], threads=16, ttl_s=60)
    store.announce("w2@host", [queue], threads=4, ttl_s=60)
    store.announce("gone@host", [queue], threads=8, ttl_s=-1)  # lapsed already
    assert store.place_in_line(job) == QueuePlace(0, 0.0, 0, 20)
    store.withdraw("w1@host", [queue, "elsewhere"])
    assert store.place_in_line(job) == QueuePlace(0, 0.0, 0, 4)


def test_every_change_callback_hears_a_webhooked_job_s_change(redis_client, settings):
    """Callbacks added with on_change are all called, in order, for a job with a webhook."""
    store = JobStore(redis_client, ttl_s=settings.job_ttl_s)
    heard: list[tuple[str, str, JobState]] = []
    store.on_change(lambda job_id, state: heard.append(("first", job_id, state)))
    store.on_change(lambda job_id, state: heard.append(("second", job_id, state)))
    spec = parse_request({"prompt": "a"}, Settings())
    hooked = Job(new_job_id(), JobState.QUEUED, spec, time.time(), webhook="https://hooks.example.com/x")
    quiet = Job(new_job_id(), JobState.QUEUED, spec, time.time())
    for record in (hooked, quiet):
        store.create(record, publish_by=record.created_at + 60)
        store.transition(record.id, JobState.RUNNING)
    assert heard == [("first", hooked.id, JobState.RUNNING), ("second", hooked.id, JobState.RUNNING)]
