"""Fixtures that start the real fleet: Redis, the S3 server, a Celery worker with the tiny
pipeline, the API under gunicorn and Flower, each a process on a free port."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import redis

from fleet import stack
from fleet.processes import BIN, free_port
from fleet.stack import settings_from_env, start_api, start_s3, start_worker
from tasks.cancel import cancel
from tasks.keyspace import QUEUED_PREFIX
from tasks.settings import Settings
from tasks.storage import make_storage
from tasks.store import JobStore
from tests.stack import start_hooks, start_redis


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fleet")


@pytest.fixture(scope="session")
def redis_server(work_dir):
    server, url = start_redis(work_dir)
    yield url
    server.stop()


@pytest.fixture(scope="session")
def s3_env(work_dir) -> dict[str, str]:
    return stack.s3_env(work_dir)


@pytest.fixture(scope="session")
def s3_server(work_dir, s3_env):
    server = start_s3(work_dir, s3_env)
    yield s3_env["FLEET_S3_ENDPOINT_URL"]
    server.stop()


@pytest.fixture(scope="session")
def tiny_model(work_dir) -> Path:
    target = work_dir / "tiny-model"
    subprocess.run([str(BIN / "fleet"), "model", "init", str(target)], check=True, capture_output=True)
    return target


@pytest.fixture(scope="session")
def fleet_env(redis_server, s3_server, s3_env, tiny_model) -> dict[str, str]:
    """The environment every fleet process of the test session runs with."""
    return {
        **s3_env,
        "FLEET_REDIS_URL": redis_server,
        "FLEET_MODEL": str(tiny_model),
        "FLEET_API_PORT": str(free_port()),
        "FLEET_FLOWER_PORT": str(free_port()),
        "FLEET_FLOWER_BASIC_AUTH": "tester:secret-pass",
        "FLEET_WORKER_METRICS_PORT": "0",
        # The tests' webhook receivers listen on loopback.
        "FLEET_WEBHOOK_ALLOW_PRIVATE": "true",
        "FLEET_WEBHOOK_BACKOFF_S": "0.2",
    }


@pytest.fixture(scope="session")
def settings(fleet_env) -> Settings:
    return settings_from_env(fleet_env)


@pytest.fixture(scope="session")
def redis_client(settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url)


@pytest.fixture(scope="session")
def store(redis_client, settings) -> JobStore:
    return JobStore(redis_client, ttl_s=settings.job_ttl_s)


@pytest.fixture(scope="session")
def storage(settings):
    return make_storage(settings)


@pytest.fixture(scope="session")
def worker_metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def worker(fleet_env, work_dir, worker_metrics_port):
    env = {**fleet_env, "FLEET_WORKER_METRICS_PORT": str(worker_metrics_port), "FLEET_MAX_WAIT_MS": "200"}
    server = start_worker(env, work_dir, "test-worker")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def api_url(fleet_env, work_dir, worker) -> str:
    server, url = start_api(fleet_env, work_dir)
    yield url
    server.stop()


#: Queues no worker consumes, for both service classes (the session worker consumes the
#: default batch queue: a fuzzed batch job sent there would take its time from other tests).
IDLE_QUEUES = {"FLEET_QUEUE": "fleet.idle", "FLEET_BATCH_QUEUE": "fleet.idle-batch", "FLEET_QUEUE_POLICIES": "{}"}


@pytest.fixture(scope="session")
def idle_api_server(fleet_env, work_dir) -> str:
    """An API whose queue no worker consumes: its jobs stay QUEUED until canceled."""
    # The OpenAI route holds a request until its job ends: here, 0.2 s and a 504 (the fuzzing
    # in test_openapi sends it hundreds, and at 1 s they took half its two minutes;
    # tests/app/test_openai.py starts its own for longer).
    env = {**fleet_env, **IDLE_QUEUES, "FLEET_OPENAI_TIMEOUT_S": "0.2", "FLEET_API_PORT": str(free_port())}
    server, url = start_api(env, work_dir, name="idle-api")
    yield url
    server.stop()


@pytest.fixture
def idle_api(idle_api_server, store, redis_client) -> str:
    """The idle API, its queues emptied first: a test that counts places in line or the
    backlog sees only its own jobs, not those an earlier test left to their ``Cancel-After``
    (the sweeper cancels them in a batch, any time within its interval)."""
    for queue in IDLE_QUEUES["FLEET_QUEUE"], IDLE_QUEUES["FLEET_BATCH_QUEUE"]:
        for job_id in redis_client.zrange(QUEUED_PREFIX + queue, 0, -1):
            job = store.get(job_id.decode() if isinstance(job_id, bytes) else job_id)
            if job is not None and not job.state.terminal:
                cancel(store, job)
    return idle_api_server


@pytest.fixture(scope="session")
def hooks(fleet_env, work_dir):
    """``fleet hooks``: delivers the webhooks the API and the worker send."""
    server = start_hooks(fleet_env, work_dir)
    yield server
    server.stop()
