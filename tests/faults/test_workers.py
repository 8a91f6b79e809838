"""Workers killed, stopped and fed poison while batches run: every accepted job still
reaches a terminal state, with its images stored once."""

from __future__ import annotations

import signal

from tasks.celery import make_celery, publish_job
from tasks.jobs import JobState
from workers.sim import CRASH_MARK, RAISE_MARK


def test_a_worker_killed_mid_batch_loses_nothing(make_fleet, broker_kind):
    fleet = make_fleet(broker_kind)
    victim = fleet.start_worker()
    fleet.start_api()
    fleet.submit_many(24)
    fleet.wait_until(fleet.running_batch, 30, "a batch running")
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    fleet.start_worker()
    fleet.settle(timeout_s=90)
    summary = fleet.check_ledger()
    assert summary["succeeded"] == 24
    redelivered = [job for job in fleet.ledger.final.values() if job.attempts > 1]
    assert redelivered, "the killed worker had reserved jobs that should have been delivered again"


def test_sigterm_finishes_the_running_batch_and_hands_back_the_rest(make_fleet, broker_kind):
    fleet = make_fleet(broker_kind, FLEET_MAX_BATCH_IMAGES="4", FLEET_MODEL="sim:a=0.1,b=0.4")
    first = fleet.start_worker(name="first")
    fleet.start_api()
    fleet.submit_many(16)
    fleet.wait_until(fleet.running_batch, 30, "a batch running")
    first.signal(signal.SIGTERM)
    assert first.proc.wait(30) == 0, "warm shutdown did not exit cleanly"
    by_first = [job for job in map(fleet.store.get, fleet.ledger.accepted) if job.state is JobState.SUCCEEDED]
    assert 1 <= len(by_first) < 16, "the running batch finishes; the rest is not run by a stopping worker"
    assert all(job.worker.startswith("first@") for job in by_first)
    assert "handing back" in first.log()
    fleet.start_worker(name="second")
    fleet.settle(timeout_s=90)
    summary = fleet.check_ledger()
    assert summary["succeeded"] == 16
    assert all(job.attempts == 1 for job in fleet.ledger.final.values()), "a hand-back is not a retry"


def test_a_job_that_makes_the_model_raise_fails_alone(make_fleet):
    fleet = make_fleet()
    fleet.start_worker()
    fleet.start_api()
    ids = fleet.submit_many(3)
    poison = fleet.submit(prompt=f"bad {RAISE_MARK}").json()["id"]
    ids += fleet.submit_many(4)
    fleet.settle(timeout_s=60)
    fleet.check_ledger()
    assert fleet.ledger.final[poison].state is JobState.FAILED
    assert "simulated model failure" in fleet.ledger.final[poison].error
    assert all(fleet.ledger.final[i].state is JobState.SUCCEEDED for i in ids)
    assert fleet.ledger.final[poison].attempts == 1


def test_a_job_that_kills_its_worker_fails_after_the_cap_and_spares_its_neighbours(make_fleet):
    fleet = make_fleet(FLEET_MAX_ATTEMPTS="2")
    fleet.start_worker()
    fleet.start_api()
    ids = fleet.submit_many(4)
    poison = fleet.submit(prompt=f"deadly {CRASH_MARK}").json()["id"]
    ids += fleet.submit_many(4)
    # A supervisor (Kubernetes, systemd) restarts workers that die.
    restarts = 0
    while not fleet.store.get(poison).state.terminal:
        assert restarts < 6, "the poison job keeps killing workers"
        fleet.wait_until(lambda: fleet.store.get(poison).state.terminal or not fleet.workers[-1].alive(), 60, "crash")
        if not fleet.workers[-1].alive():
            fleet.start_worker()
            restarts += 1
    fleet.settle(timeout_s=60)
    fleet.check_ledger()
    dead = fleet.ledger.final[poison]
    assert dead.state is JobState.FAILED and "died 2 times" in dead.error
    assert all(fleet.ledger.final[i].state is JobState.SUCCEEDED for i in ids)


def test_the_same_message_twice_gives_one_set_of_images(make_fleet):
    fleet = make_fleet()
    worker = fleet.start_worker()
    fleet.start_api()
    celery_app = make_celery(fleet.settings)
    early = fleet.submit(num_images=2).json()["id"]
    publish_job(celery_app, early, fleet.settings.queue, 5)  # duplicated while queued
    late = fleet.submit(num_images=2).json()["id"]
    fleet.settle()
    finished = fleet.store.get(late)
    done_before = worker.log().count("succeeded in")
    publish_job(celery_app, late, fleet.settings.queue, 5)  # duplicated after it finished
    fleet.wait_until(lambda: worker.log().count("succeeded in") > done_before, 30, "the duplicate handled")
    assert fleet.store.get(late) == finished, "a finished job never changes"
    fleet.settle()
    summary = fleet.check_ledger()
    assert summary["succeeded"] == 2
