"""The engine dying on its own while batches run (kill -9 as the OOM killer does it, a
segfault, a device error, an abort): the worker notices at once, its jobs in the call are
counted and run alone next (a poison job fails at the cap), its queued jobs run on a new
engine, the worker keeps consuming, and the ledger balances on both brokers."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from fleet.processes import Server, wait_for
from tasks.jobs import JobState
from workers.sim import CRASH_MARK, DEVICE_LOST_MARK, SEGFAULT_MARK

RESTARTED = "a new engine is ready"


def engine_pid(worker: Server) -> int:
    """The engine the worker runs now, from its log."""
    pids = re.findall(r"engine pid (\d+)|new engine is ready \(pid (\d+)\)", worker.log())
    return int(next(p for p in reversed(pids[-1]) if p))


def test_an_engine_killed_mid_batch_is_noticed_at_once_and_every_job_still_succeeds(make_fleet, broker_kind):
    fleet = make_fleet(broker_kind)
    worker = fleet.start_worker()
    fleet.start_api()
    fleet.submit_many(24)
    fleet.wait_until(fleet.running_batch, 30, "a batch running")
    os.kill(engine_pid(worker), signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: "killed by SIGKILL" in worker.log(), 10, "the worker noticing")
    assert time.monotonic() - killed < 1.0, "the engine's death must be noticed within a second"
    fleet.settle(timeout_s=90)
    summary = fleet.check_ledger()
    assert summary["succeeded"] == 24
    assert worker.alive() and worker.log().count(RESTARTED) == 1
    in_the_call = [job for job in fleet.ledger.final.values() if job.crashes > 0]
    assert in_the_call, "the jobs that were in the killed call keep their crash count"
    assert all(job.attempts == 1 for job in fleet.ledger.final.values()), "nothing went back to the broker"


@pytest.mark.parametrize(
    ("mark", "reason"),
    [
        (SEGFAULT_MARK, "killed by SIGSEGV"),
        (DEVICE_LOST_MARK, "exited after a device error"),
        (CRASH_MARK, "exited with code 70"),
    ],
    ids=["segfault", "device-lost", "abort"],
)
def test_a_job_that_brings_down_the_engine_fails_at_the_cap_and_spares_its_neighbours(
    make_fleet, broker_kind, mark, reason
):
    fleet = make_fleet(broker_kind, FLEET_MAX_ATTEMPTS="2")
    worker = fleet.start_worker()
    fleet.start_api()
    ids = fleet.submit_many(4)
    poison = fleet.submit(prompt=f"deadly {mark}").json()["id"]
    ids += fleet.submit_many(4)
    fleet.settle(timeout_s=90)
    fleet.check_ledger()
    dead = fleet.ledger.final[poison]
    assert dead.state is JobState.FAILED and "died 2 times" in dead.error
    assert all(fleet.ledger.final[i].state is JobState.SUCCEEDED for i in ids)
    assert worker.alive(), "the worker outlives its engine"
    assert reason in worker.log()
    # The poison job ends FAILED when its second engine dies, before the worker has a third
    # one ready: the ledger settling says nothing of that restart, so wait for it.
    wait_for(lambda: worker.log().count(RESTARTED) == 2, 60, "the engine after the second death", worker.proc)


def test_an_engine_killed_with_slots_at_different_steps_loses_no_job(make_fleet):
    """Step-level batching: jobs joined the running batch at different steps. Killed, the
    engine loses their latents; each job is retried from its first step (a crash counted,
    run alone next), and each succeeds."""
    fleet = make_fleet("redis", FLEET_BATCHING="step", FLEET_MODEL="sim:a=0.02,b=1.0,steps=20")
    worker = fleet.start_worker()
    fleet.start_api()

    def steps_apart() -> bool:
        jobs = [fleet.store.get(i) for i in fleet.ledger.accepted]
        steps = {job.step for job in jobs if job is not None and job.state is JobState.RUNNING and job.step}
        return len(steps) >= 2

    fleet.submit(steps=40)
    for i in range(6):
        fleet.submit(seed=i, steps=20)
        if steps_apart():
            break
        time.sleep(0.15)
    fleet.wait_until(steps_apart, 30, "running jobs at different steps")
    os.kill(engine_pid(worker), signal.SIGKILL)
    wait_for(lambda: "killed by SIGKILL" in worker.log(), 10, "the worker noticing")
    fleet.settle(timeout_s=90)
    summary = fleet.check_ledger()
    assert summary["succeeded"] == len(fleet.ledger.accepted)
    crashed = [job for job in fleet.ledger.final.values() if job.crashes > 0]
    assert len(crashed) >= 2, "every job in the killed group keeps its crash count"
    assert all(job.attempts == 1 for job in fleet.ledger.final.values()), "nothing went back to the broker"
