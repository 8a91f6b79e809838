"""Many links cut at once under a stream of jobs, on both brokers (a partition nemesis, as
Jepsen runs one): workers cut from the broker, from storage and from the job store, the API
cut from the broker and then from the job store while clients submit, a webhook receiver
unreachable, one worker on a slow, lossy link throughout. Every accepted job ends once with
its images; no worker exits; each consumes again soon after its heal."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import requests

from tasks.jobs import JobState
from tasks.settings import Settings
from tasks.webhooks import webhook_secret
from tests.partitions.net import Host
from tests.tasks.test_webhooks import Receiver

#: the longest cut; the stream of jobs goes on this long after it heals
LONGEST_S = 45
TAIL_S = 12
#: a job every this many seconds: the stream brings 300 and more over the run
SUBMIT_EVERY_S = 0.12


@dataclass
class Fault:
    scenario: str
    host: Host
    ports: tuple[int, ...]
    start_s: float
    length_s: float
    worker: str | None = None
    healed_at: float = 0.0

    def run(self, t0: float) -> None:
        time.sleep(max(0.0, t0 + self.start_s - time.time()))
        self.host.cut(*self.ports)
        time.sleep(self.length_s)
        self.host.heal()
        self.healed_at = time.time()


@dataclass
class Client:
    """Submits a job every ``SUBMIT_EVERY_S`` until told to stop; every answer is a 202 (a
    job that must run) or a 503 with ``Retry-After``, never a hang or a 500."""

    fleet: object
    webhook: str
    answers: dict[int, int] = field(default_factory=dict)
    wrong: list[str] = field(default_factory=list)
    slowest_s: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            body = {"prompt": "nemesis", "steps": 4, "seed": n}
            if n % 10 == 0:
                body["webhook"] = self.webhook
            began = time.monotonic()
            try:
                response = self.fleet.submit(**body)  # type: ignore[attr-defined]
            except requests.RequestException as exc:
                self.wrong.append(f"no answer: {exc}")
                continue
            self.slowest_s = max(self.slowest_s, time.monotonic() - began)
            self.answers[response.status_code] = self.answers.get(response.status_code, 0) + 1
            if response.status_code == 503:
                if not response.headers.get("Retry-After") or response.json()["error"]["code"] != "unavailable":
                    self.wrong.append(f"503 without Retry-After: {response.text}")
            elif response.status_code != 202:
                self.wrong.append(f"{response.status_code}: {response.text}")
            self.stop.wait(max(0.0, SUBMIT_EVERY_S - (time.monotonic() - began)))


def first_job_after(fleet, worker: str, since: float) -> float | None:
    """Seconds from ``since`` (wall clock) until ``worker`` finished a job submitted after
    it (a message it took after the heal, not one it held through the cut)."""
    done = [
        job.finished_at
        for job in fleet.ledger.final.values()
        if job.state is JobState.SUCCEEDED
        and (job.worker or "").startswith(f"{worker}@")
        and job.created_at >= since
        and job.finished_at is not None
    ]
    return min(done) - since if done else None


def test_a_partition_nemesis_loses_nothing(make_fleet, broker_kind, network, services):
    """Cuts of 5, 15 and 45 s worker-broker, 20 s worker-storage and worker-job store, 10 s
    API-broker then API-job store, 30 s hooks-receiver, and a 512 kbit/s link losing 10% of
    its packets, all under one stream of 300+ jobs: nothing lost or stuck, no image key with
    two different contents, every worker alive and consuming again within 30 s of its heal."""
    fleet = make_fleet(FLEET_WEBHOOK_ALLOW_PRIVATE="true", FLEET_WEBHOOK_BACKOFF_S="0.5", FLEET_WEBHOOK_TIMEOUT_S="2")
    receiver = Receiver(webhook_secret(Settings(), "dev"), host=network.service_ip)
    storage_port, store_port, broker_port = services.s3_port, services.store_port, services.broker_port
    try:
        fleet.start_worker()  # on the services' host, never cut
        with ThreadPoolExecutor(6) as pool:
            started = list(pool.map(lambda _: fleet.start_worker_on_host(), range(6)))
        hooks_host = network.host()
        fleet.start_hooks(prefix=hooks_host.command([]))
        api_host = fleet.start_api_on_host()
        names = [name for _, name, _ in started]
        h_5, h_15, h_long, h_s3, h_store, h_slow = (host for _, _, host in started)
        w_5, w_15, w_long, w_s3, w_store = names[:5]
        faults = [
            Fault("worker-broker 5 s", h_5, (broker_port,), 2, 5, w_5),
            Fault("worker-broker 15 s", h_15, (broker_port,), 2, 15, w_15),
            Fault(f"worker-broker {LONGEST_S} s", h_long, (broker_port,), 2, LONGEST_S, w_long),
            Fault("worker-storage 20 s", h_s3, (storage_port,), 2, 20, w_s3),
            Fault("worker-job store 20 s", h_store, (store_port,), 2, 20, w_store),
            Fault("hooks-receiver 30 s", hooks_host, (receiver.port,), 2, 30),
            Fault("API-broker 10 s", api_host, (broker_port,), 25, 10),
            Fault("API-job store 10 s", api_host, (store_port,), 40, 10),
        ]
        h_slow.slow(512)
        h_slow.lose(10)
        client = Client(fleet, receiver.url("/ok"))
        stream = threading.Thread(target=client.run)
        t0 = time.time()
        stream.start()
        with ThreadPoolExecutor(len(faults)) as pool:
            for done in [pool.submit(fault.run, t0) for fault in faults]:
                done.result()
        time.sleep(TAIL_S)
        client.stop.set()
        stream.join()
        h_slow.heal()

        fleet.settle(180)
        summary = fleet.check_ledger()
        duplicates = fleet.conflicting_images()
        recovery = {f.scenario: first_job_after(fleet, f.worker, f.healed_at) for f in faults if f.worker}
        hooked = [i for i, job in fleet.ledger.final.items() if job.webhook]
        completed = _completed(receiver)
        report = {
            "broker": broker_kind,
            **summary,
            "refused_503": client.answers.get(503, 0),
            "slowest_answer_s": round(client.slowest_s, 1),
            "conflicting_duplicates": len(duplicates),
            "recovery_s": {k: (round(v, 1) if v is not None else None) for k, v in recovery.items()},
            "webhooks_completed": f"{len(completed & set(hooked))}/{len(hooked)}",
        }
        print(json.dumps(report))
        for worker in fleet.workers:
            assert worker.alive(), f"{worker.name} exited:\n{worker.log()[-3000:]}"
        assert not client.wrong, client.wrong[:5]
        assert summary["accepted"] >= 300
        assert not duplicates, duplicates[:5]
        assert all(v is not None and v < 30 for v in recovery.values()), recovery
        fleet.wait_until(lambda: set(hooked) <= _completed(receiver), 60, "every completed webhook")
    finally:
        receiver.close()


def _completed(receiver: Receiver) -> set[str]:
    return {json.loads(r.body)["data"]["id"] for r in receiver.hits("/ok") if json.loads(r.body)["type"] == "completed"}
