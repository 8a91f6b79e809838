"""Scale-in under load, as Kubernetes does it: several workers share a queue while jobs
keep arriving, and some of them get SIGTERM (the pod is deleted). Each stops taking
messages, finishes its running batch, hands back what it had not started and exits well
inside a grace period; the others carry on; every accepted job ends SUCCEEDED, once.

It also shows why the fleet scales on its own backlog and not the broker's queue length:
the messages workers have prefetched are gone from the broker's list but not done."""

from __future__ import annotations

import signal
import threading
import time

import redis

from tasks.celery import queued_messages

#: What a pod gets between SIGTERM and SIGKILL in the manifests is far longer; a worker
#: here must be gone within this, its running batch (under a second) included.
GRACE_S = 30


def test_workers_terminated_under_load_lose_nothing(make_fleet, broker_kind):
    fleet = make_fleet(broker_kind, FLEET_MAX_BATCH_IMAGES="4", FLEET_MODEL="sim:a=0.05,b=0.3")
    workers = [fleet.start_worker(name=f"pod{i}") for i in range(3)]
    fleet.start_api()

    stop_sending = threading.Event()

    def keep_sending() -> None:  # an open loop of jobs while workers go away
        for i in range(60):
            if stop_sending.is_set():
                return
            fleet.submit(seed=i)
            time.sleep(0.05)

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        fleet.wait_until(fleet.running_batch, 30, "a batch running")
        if broker_kind == "redis":
            # the true backlog counts what workers prefetched; the broker's list does not
            queue = fleet.settings.queue
            backlog = sum(fleet.store.backlog([queue])[queue])
            waiting = queued_messages(redis.Redis.from_url(fleet.settings.redis_url), queue)
            assert backlog > waiting, (backlog, waiting)
        for victim in workers[:2]:
            fleet.wait_until(fleet.running_batch, 30, "a batch running")
            victim.signal(signal.SIGTERM)
            assert victim.proc.wait(GRACE_S) == 0, "a terminated worker must exit cleanly inside its grace period"
            assert "handing back" in victim.log()
    finally:
        stop_sending.set()
        sender.join(60)
    fleet.settle(timeout_s=120)
    summary = fleet.check_ledger()
    assert summary["succeeded"] == summary["accepted"] == len(fleet.ledger.accepted) >= 20
    by_worker = {job.worker.split("@")[0] for job in fleet.ledger.final.values()}
    assert "pod2" in by_worker and by_worker & {"pod0", "pod1"}, by_worker
    assert all(job.attempts == 1 for job in fleet.ledger.final.values()), "a hand-back is not a retry"
