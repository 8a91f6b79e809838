"""Workers killed, stopped and fed poison while batches run: every accepted job still
reaches a terminal state, with its images stored once."""

from __future__ import annotations

import random
import signal
import socket

import requests

from fleet.processes import BIN, Server, free_port
from tasks.celery import make_celery, publish_job
from tasks.jobs import JobState
from workers.celery import EXIT_NOT_STARTED
from workers.sim import RAISE_MARK


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


def free_port_pair() -> int:
    """A port whose successor is free too (two slots' metrics ports), below the ephemeral
    range, where the kernel would hand the successor to some client connection meanwhile."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000, 2)
        if all(bindable(p) for p in (port, port + 1)):
            return port
    raise RuntimeError("no two adjacent free ports")


def bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_the_readme_worker_command_twice_on_one_host_gives_two_workers_that_share_the_queue(make_fleet, broker_kind):
    base = free_port_pair()
    fleet = make_fleet(broker_kind, FLEET_WORKER_METRICS_PORT=str(base), FLEET_MAX_BATCH_IMAGES="4")
    (_, first), (_, second) = fleet.start_slot_worker(), fleet.start_slot_worker()
    assert {first, second} == {"worker0", "worker1"}
    for port in (base, base + 1):
        assert "fleet_batch_images" in requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    fleet.start_api()
    fleet.submit_many(32)
    fleet.settle(timeout_s=90)
    assert fleet.check_ledger()["succeeded"] == 32
    ran = {job.worker.split("@")[0] for job in fleet.ledger.final.values()}
    assert ran == {"worker0", "worker1"}, "both workers took jobs"


def test_a_worker_that_cannot_start_never_takes_a_job(make_fleet, broker_kind):
    taken = free_port()
    fleet = make_fleet(broker_kind, FLEET_WORKER_METRICS_PORT=str(taken))
    fleet.start_api()
    ids = fleet.submit_many(4)

    def doomed(name: str, **env: str) -> Server:
        args = [str(BIN / "celery"), "-A", "workers", "worker", "-n", f"{name}@%h"]
        worker = Server(name, args, env={**fleet.env, **env}, log_dir=fleet.work_dir).start()
        assert worker.proc.wait(60) == EXIT_NOT_STARTED
        return worker

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        assert f"metrics port {taken} is taken" in doomed("port-taken").log()
    no_model = doomed("no-model", FLEET_WORKER_METRICS_PORT="0", FLEET_MODEL=str(fleet.work_dir / "no-such-model"))
    assert "fleet model init" in no_model.log(), "the engine's load error says what to do"
    assert all(state is JobState.QUEUED for state in fleet.store.states(ids).values())
    fleet.start_worker(FLEET_WORKER_METRICS_PORT="0")
    fleet.settle(timeout_s=60)
    assert fleet.check_ledger()["succeeded"] == 4


def test_a_worker_killed_in_the_middle_of_a_model_swap_loses_nothing(make_fleet, fault_dir):
    """A worker serving two models with room for one: its engine is loading the second
    (3 s) when the worker is killed with -9. Every job of both models still succeeds, on
    the worker started after it."""
    registry = fault_dir / f"swap-{free_port()}.toml"
    model = "sim:a=0.01,b=0.05,load_s=3,mem=100"
    registry.write_text(f'[models.sim-a]\npath = "{model}"\n\n[models.sim-b]\npath = "{model}"\n')
    fleet = make_fleet(
        FLEET_MODELS_FILE=str(registry), FLEET_SERVE="sim-a,sim-b", FLEET_MODEL_MEMORY_MB="150", FLEET_MAX_WAIT_MS="0"
    )
    victim = fleet.start_worker()
    fleet.start_api()
    fleet.submit_many(4, model="sim-a")
    fleet.submit_many(4, model="sim-b")
    fleet.wait_until(lambda: "loading model sim-b" in victim.log(), 30, "the engine loading sim-b")
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    fleet.start_worker()
    fleet.settle(timeout_s=90)
    assert fleet.check_ledger()["succeeded"] == 8
    assert {job.spec.model for job in fleet.ledger.final.values()} == {"sim-a", "sim-b"}
