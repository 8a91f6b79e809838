"""A fleet under test and its ledger: the processes a fault test starts, stops and
breaks, and the proof that every job the API accepted reached a terminal state with its
images stored exactly once. The fault suite (``tests/faults``) and the partition suite
(``tests/partitions``) both build on it."""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis
import requests

from fleet.processes import Server, free_port, wait_for
from fleet.stack import RedisServer, S3Server, settings_from_env, start_api
from fleet.stack import start_worker as start_worker_process
from tasks.jobs import Job, JobState
from tasks.storage import make_storage
from tasks.store import JobStore
from tests.helpers import http
from tests.stack import RabbitMQ, start_hooks, start_slot_worker

#: batches of 8 take ~0.5 s: long enough to kill a worker in the middle of one
SIM_MODEL = "sim:a=0.04,b=0.2"


def fault_fleet_env(queue_prefix: str, **overrides: str) -> dict[str, str]:
    """What every fleet a fault test builds runs with: the simulated model, a queue and an
    API port of its own, fixed batches of 8, short retry and outbox timings. Each suite
    passes the timeouts its faults need."""
    return {
        "FLEET_MODEL": SIM_MODEL,
        "FLEET_QUEUE": f"{queue_prefix}-{free_port()}",
        "FLEET_API_PORT": str(free_port()),
        "FLEET_WORKER_METRICS_PORT": "0",
        "FLEET_MAX_BATCH_IMAGES": "8",
        "FLEET_MAX_WAIT_MS": "100",
        "FLEET_BATCH_POLICY": "fixed",
        "FLEET_RETRY_BACKOFF_S": "0.2",
        "FLEET_OUTBOX_GRACE_S": "1",
        "FLEET_SWEEP_INTERVAL_S": "0.5",
        **overrides,
    }


class Broker:
    """The broker under test: the job-store Redis itself, or a RabbitMQ node."""

    def __init__(self, kind: str, redis_server: RedisServer, rabbit: RabbitMQ | None):
        self.kind = kind
        self._redis = redis_server
        self._rabbit = rabbit

    @property
    def url(self) -> str:
        return self._rabbit.url if self.kind == "rabbitmq" else self._redis.url

    @property
    def port(self) -> int:
        return self._rabbit.port if self._rabbit is not None else self._redis.port

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
    def start_worker(self, name: str | None = None, prefix: Sequence[str] = (), **env: str) -> Server:
        name = name or f"w{len(self.workers)}-{free_port()}"
        worker = start_worker_process({**self.env, **env}, self.work_dir, name, prefix=prefix)
        self.workers.append(worker)
        return worker

    def start_slot_worker(self, **env: str) -> tuple[Server, str]:
        """``fleet worker`` as the README runs it; returns the worker and its name."""
        worker, name = start_slot_worker({**self.env, **env}, self.work_dir, f"slot-worker-{free_port()}")
        self.workers.append(worker)
        return worker, name

    def start_hooks(self, prefix: Sequence[str] = ()) -> Server:
        """``fleet hooks``: delivers the webhooks of this fleet's jobs."""
        hooks = start_hooks(self.env, self.work_dir, name=f"hooks-{free_port()}", prefix=prefix)
        self.workers.append(hooks)
        return hooks

    def start_api(self, prefix: Sequence[str] = (), **env: str) -> str:
        self.api, self.api_url = start_api({**self.env, **env}, self.work_dir, prefix=prefix)
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
