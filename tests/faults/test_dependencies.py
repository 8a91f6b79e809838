"""The broker, the job store and storage going away and coming back, and the API dying
between recording a job and publishing it: no accepted job is lost or stuck."""

from __future__ import annotations

import time

import requests

from fleet.processes import Server
from tasks.jobs import Job, JobState, new_job_id, parse_request
from tasks.keyspace import KEY_PREFIX, OUTBOX_KEY
from tasks.store import now
from tests.helpers import http


def retried(worker: Server, what: str, reason: str) -> bool:
    """The worker logged a retry with backoff of ``what`` failing for ``reason``."""
    return any(what in line and reason in line and "retrying in" in line for line in worker.log().splitlines())


def test_broker_restarted_while_jobs_are_queued(make_fleet, broker_kind):
    fleet = make_fleet(broker_kind)
    fleet.start_api()
    fleet.submit_many(10)
    fleet.broker.restart()
    fleet.start_worker()
    fleet.settle(timeout_s=90)
    assert fleet.check_ledger()["succeeded"] == 10


def test_broker_restarted_while_a_batch_runs(make_fleet, broker_kind):
    fleet = make_fleet(broker_kind, FLEET_MODEL="sim:a=0.1,b=0.5")
    fleet.start_worker()
    fleet.start_api()
    fleet.submit_many(16)
    fleet.wait_until(fleet.running_batch, 30, "a batch running")
    fleet.broker.restart()
    fleet.settle(timeout_s=120)
    assert fleet.check_ledger()["succeeded"] == 16


def test_broker_down_at_submit_is_503_and_leaves_no_queued_job(make_fleet, store_redis):
    """On RabbitMQ: with Redis as broker, the broker is the job store (the next test)."""
    import redis

    fleet = make_fleet("rabbitmq")
    fleet.start_api()
    client = redis.Redis.from_url(store_redis.url)
    fleet.broker.stop()
    try:
        before = sum(1 for _ in client.scan_iter(f"{KEY_PREFIX}*"))
        started = time.monotonic()
        response = fleet.submit()
        assert response.status_code == 503, response.text
        assert "broker" in response.json()["error"]["message"]
        assert time.monotonic() - started < 15
        assert sum(1 for _ in client.scan_iter(f"{KEY_PREFIX}*")) == before
        assert requests.get(f"{fleet.api_url}/readyz", timeout=30).status_code == 503
    finally:
        fleet.broker.start()
    fleet.start_worker()
    fleet.submit()
    fleet.settle()
    assert fleet.check_ledger()["succeeded"] == 1


def test_job_store_down_at_submit_is_503(make_fleet, store_redis):
    fleet = make_fleet("redis")
    fleet.start_api()
    store_redis.stop()
    try:
        response = fleet.submit()
        assert response.status_code == 503
        assert response.headers["Retry-After"]
    finally:
        store_redis.start()
    assert fleet.ledger.accepted == []


def test_a_job_recorded_but_never_published_is_published_by_the_sweeper(make_fleet):
    """What the API leaves behind when it dies between recording a job and publishing it."""
    fleet = make_fleet()
    fleet.start_worker()
    spec = parse_request({"prompt": "orphan", "seed": 1, "steps": 4}, fleet.settings)
    job = Job(id=new_job_id(), state=JobState.QUEUED, spec=spec, created_at=now(), queue=fleet.settings.queue)
    fleet.store.create(job, publish_by=job.created_at + fleet.settings.outbox_grace_s)
    fleet.ledger.accepted.append(job.id)
    started = time.monotonic()
    fleet.settle(timeout_s=30)
    assert fleet.check_ledger()["succeeded"] == 1
    assert time.monotonic() - started < fleet.settings.outbox_grace_s + 10
    assert fleet.store._redis.zscore(OUTBOX_KEY, job.id) is None


def test_storage_down_while_a_batch_finishes_is_retried(make_fleet):
    fleet = make_fleet(FLEET_MODEL="sim:a=0.1,b=0.5")
    fleet.start_worker()
    fleet.start_api()
    fleet.stop_s3()
    fleet.submit_many(6)
    worker = fleet.workers[-1]
    fleet.wait_until(lambda: retried(worker, "uploading jobs/", "storage is unavailable"), 60, "an upload retried")
    fleet.start_s3()
    fleet.settle(timeout_s=60)
    assert fleet.check_ledger()["succeeded"] == 6


def test_storage_down_past_the_retry_window_fails_the_job_with_a_reason(make_fleet):
    fleet = make_fleet(FLEET_RETRY_WINDOW_S="2")
    fleet.start_worker()
    fleet.start_api()
    fleet.stop_s3()
    try:
        fleet.submit_many(2)
        fleet.settle(timeout_s=60)
    finally:
        fleet.start_s3()
    summary = fleet.check_ledger()
    assert summary["failed_with_reason"] == 2
    assert all("could not store the images" in job.error for job in fleet.ledger.final.values())


def test_job_store_down_while_a_batch_finishes_is_retried(make_fleet, store_redis):
    """On RabbitMQ, so that only the store goes away (with Redis it is also the broker)."""
    fleet = make_fleet("rabbitmq", FLEET_MODEL="sim:a=0.1,b=0.5")
    fleet.start_worker()
    fleet.start_api()
    fleet.submit_many(8)
    fleet.wait_until(fleet.running_batch, 30, "a batch running")
    store_redis.stop()
    worker = fleet.workers[-1]
    fleet.wait_until(lambda: retried(worker, "", "job store is unavailable"), 60, "a job-store call retried")
    store_redis.start()
    fleet.settle(timeout_s=90)
    assert fleet.check_ledger()["succeeded"] == 8


def test_job_records_expire_after_their_ttl(make_fleet):
    fleet = make_fleet(FLEET_JOB_TTL_S="3")
    fleet.start_worker()
    fleet.start_api()
    job_id = fleet.submit().json()["id"]
    fleet.settle()
    assert 0 < fleet.store.ttl(job_id) <= 3
    status = lambda: http.get(f"{fleet.api_url}/v1/jobs/{job_id}", timeout=10).status_code  # noqa: E731
    assert status() == 200
    fleet.wait_until(lambda: status() == 404, 10, "the record to expire")
