"""A fleet to break: real Redis, RabbitMQ and S3 processes that tests stop, kill and
restart, workers on the simulated model (batches take real time, so a kill lands
mid-batch), and a ledger that proves every accepted job reached a terminal state."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import requests

from fleet.processes import Server, free_port, wait_for
from fleet.stack import RedisServer, S3Server, s3_env, settings_from_env, start_api, start_s3
from fleet.stack import start_worker as start_worker_process
from tasks.jobs import Job, JobState
from tasks.storage import make_storage
from tasks.store import JobStore
from tests.helpers import http
from tests.stack import RabbitMQ, rabbitmq_available, start_slot_worker

#: batches of 8 take ~0.5 s: long enough to kill a worker in the middle of one
SIM_MODEL = "sim:a=0.04,b=0.2"
BROKERS = ["redis", "rabbitmq"]


def pytest_generate_tests(metafunc):
    if "broker_kind" in metafunc.fixturenames:
        metafunc.parametrize("broker_kind", BROKERS, scope="module")


@pytest.fixture(scope="module")
def fault_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def store_redis(fault_dir):
    server = RedisServer(fault_dir, appendonly=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rabbitmq(fault_dir):
    if not rabbitmq_available():
        if os.environ.get("CI"):
            pytest.fail("RabbitMQ is not installed: .ci/run installs Debian's rabbitmq-server")
        pytest.skip("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
    server = RabbitMQ(fault_dir).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def storage_env(fault_dir):
    env = s3_env(fault_dir)
    server = start_s3(fault_dir, env)
    yield env, server
    server.stop()


class Broker:
    """The broker under test: the job-store Redis itself, or a RabbitMQ node."""

    def __init__(self, kind: str, redis_server: RedisServer, rabbit: RabbitMQ | None):
        self.kind = kind
        self._redis = redis_server
        self._rabbit = rabbit

    @property
    def url(self) -> str:
        return self._rabbit.url if self.kind == "rabbitmq" else self._redis.url

    def stop(self) -> None:
        (self._rabbit if self.kind == "rabbitmq" else self._redis).stop()

    def start(self) -> None:
        (self._rabbit if self.kind == "rabbitmq" else self._redis).start()

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass
class Ledger:
    """Every job the API accepted, and what became of it."""

    accepted: list[str] = field(default_factory=list)
    refused: int = 0
    final: dict[str, Job] = field(default_factory=dict)

    def summary(self) -> dict[str, int]:
        states = [job.state for job in self.final.values()]
        return {
            "accepted": len(self.accepted),
            "succeeded": states.count(JobState.SUCCEEDED),
            "failed_with_reason": sum(1 for j in self.final.values() if j.state is JobState.FAILED and j.error),
            "lost": len(self.accepted) - len(self.final),
        }


class FaultFleet:
    def __init__(self, work_dir: Path, env: dict[str, str], broker: Broker, s3_server: S3Server):
        self.work_dir = work_dir
        self.env = env
        self.broker = broker
        self.s3_server = s3_server
        self.settings = settings_from_env(env)
        self.store = JobStore(redis.Redis.from_url(self.settings.redis_url), ttl_s=self.settings.job_ttl_s)
        self.storage = make_storage(self.settings)
        self.workers: list[Server] = []
        self.api: Server | None = None
        self.api_url = ""
        self.ledger = Ledger()

    # -- processes ---------------------------------------------------------------------
    def start_worker(self, name: str | None = None, **env: str) -> Server:
        name = name or f"w{len(self.workers)}-{free_port()}"
        worker = start_worker_process({**self.env, **env}, self.work_dir, name)
        self.workers.append(worker)
        return worker

    def start_slot_worker(self, **env: str) -> tuple[Server, str]:
        """``fleet worker`` as the README runs it; returns the worker and its name."""
        worker, name = start_slot_worker({**self.env, **env}, self.work_dir, f"slot-worker-{free_port()}")
        self.workers.append(worker)
        return worker, name

    def start_api(self) -> str:
        self.api, self.api_url = start_api(self.env, self.work_dir)
        return self.api_url

    def stop_s3(self) -> None:
        self.s3_server.stop()

    def start_s3(self) -> None:
        self.s3_server.start()

    def stop(self) -> None:
        for worker in self.workers:
            if worker.alive():
                worker.proc.send_signal(signal.SIGKILL)
            worker.stop()
        if self.api:
            self.api.stop()

    # -- jobs --------------------------------------------------------------------------
    def submit(self, **body) -> requests.Response:
        body = {"prompt": "fault test", "steps": 4, **body}
        response = http.post(f"{self.api_url}/v1/jobs", json=body, timeout=30)
        if response.status_code == 202:
            self.ledger.accepted.append(response.json()["id"])
        else:
            self.ledger.refused += 1
        return response

    def submit_many(self, count: int, **body) -> list[str]:
        return [self.submit(seed=i, **body).json()["id"] for i in range(count)]

    def wait_until(self, predicate, timeout_s: float, what: str) -> None:
        wait_for(predicate, timeout_s, what)

    def running_batch(self) -> bool:
        """Some accepted job is in a model call right now."""
        states = self.store.states(self.ledger.accepted)
        running = [i for i, state in states.items() if state is JobState.RUNNING]
        return any((job := self.store.get(i)) is not None and job.crashes > 0 for i in running)

    def settle(self, timeout_s: float = 120) -> Ledger:
        """Wait until every accepted job is terminal; fail naming those stuck."""
        deadline = time.monotonic() + timeout_s
        pending = set(self.ledger.accepted)
        while pending and time.monotonic() < deadline:
            states = self.store.states(sorted(pending))
            pending -= {i for i, s in states.items() if s is not None and s.terminal}
            time.sleep(0.2)
        for job_id in self.ledger.accepted:
            job = self.store.get(job_id)
            if job is not None and job.state.terminal:
                self.ledger.final[job_id] = job
        stuck = {i: (self.store.get(i).state.value if self.store.get(i) else "MISSING") for i in pending}
        assert not stuck, f"{len(stuck)} accepted jobs never finished: {stuck}"
        return self.ledger

    def check_ledger(self) -> dict[str, int]:
        """Every SUCCEEDED job's images download, once; every FAILED job has a reason."""
        for job_id, job in self.ledger.final.items():
            if job.state is JobState.FAILED:
                assert job.error, f"job {job_id} failed without a reason"
                continue
            assert job.state is JobState.SUCCEEDED
            keys = self.storage.list_keys(f"jobs/{job_id}/")
            assert keys == sorted(job.image_keys), f"job {job_id}: stored {keys}, recorded {job.image_keys}"
            assert len(keys) == job.spec.num_images
            for key in keys:
                assert requests.get(self.storage.presign(key).url, timeout=10).status_code == 200
        summary = self.ledger.summary()
        assert summary["lost"] == 0
        return summary


@pytest.fixture
def make_fleet(fault_dir, store_redis, storage_env, request):
    """Build a fleet on the given broker with a queue of its own; stopped after the test."""
    fleets: list[FaultFleet] = []

    def build(broker_kind: str = "redis", **env: str) -> FaultFleet:
        rabbit = request.getfixturevalue("rabbitmq") if broker_kind == "rabbitmq" else None
        broker = Broker(broker_kind, store_redis, rabbit)
        s3, s3_server = storage_env
        fleet_env = {
            **s3,
            "FLEET_REDIS_URL": store_redis.url,
            "FLEET_BROKER_URL": broker.url,
            "FLEET_MODEL": SIM_MODEL,
            "FLEET_QUEUE": f"faults-{free_port()}",
            "FLEET_API_PORT": str(free_port()),
            "FLEET_WORKER_METRICS_PORT": "0",
            "FLEET_MAX_BATCH_IMAGES": "8",
            "FLEET_MAX_WAIT_MS": "100",
            "FLEET_BATCH_POLICY": "fixed",
            "FLEET_VISIBILITY_TIMEOUT_S": "6",
            "FLEET_RETRY_WINDOW_S": "20",
            "FLEET_RETRY_BACKOFF_S": "0.2",
            "FLEET_OUTBOX_GRACE_S": "1",
            "FLEET_REPUBLISH_AFTER_S": "8",
            "FLEET_SWEEP_INTERVAL_S": "0.5",
            "FLEET_PUBLISH_TIMEOUT_S": "1",
            **env,
        }
        fleet = FaultFleet(fault_dir, fleet_env, broker, s3_server)
        fleets.append(fleet)
        return fleet

    yield build
    for fleet in fleets:
        fleet.stop()
