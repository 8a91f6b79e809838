"""Half-open broker connections: the broker is gone but the worker's socket never hears of
it (a proxy drops the broker's side and keeps the worker's side silent). The worker must
notice by itself, consume again, and stop when told, never held by the dead connection."""

from __future__ import annotations

import signal
import time

import pytest

#: a warm shutdown finishes a batch (under a second here) and closes its connections; one
#: held by a dead socket is bounded by the publish timeout (2 s here) and the heartbeat
STOP_WITHIN_S = 25


@pytest.fixture
def half_open_fleet(make_fleet, broker_kind):
    # A dead connection is noticed 2 to 2.5 heartbeats after its last frame (RabbitMQ: the
    # consumer's heartbeat check; Redis: the health check, then the socket timeout), then
    # the worker reconnects and takes a job: 5 s heartbeats keep that well inside 30 s.
    fleet = make_fleet(FLEET_BROKER_HEARTBEAT_S="5")
    fleet.start_worker()  # takes the jobs the other one held
    env, (proxy,) = fleet.through_proxies("FLEET_BROKER_URL")
    worker, name, _ = fleet.start_worker_on_host(**env)
    fleet.start_api()
    return fleet, worker, name, proxy


def test_a_half_open_broker_connection_is_noticed_and_dropped(half_open_fleet, broker_kind):
    """The worker's broker connections go half open in the middle of a stream of jobs: the
    worker drops them and consumes again within 30 s, and nothing is lost."""
    fleet, worker, name, proxy = half_open_fleet
    fleet.submit_many(24)
    fleet.wait_until(lambda: fleet.ran_on(name), 30, f"{name} running jobs")
    proxy.half_open()
    healed = time.monotonic()
    recovered = fleet.seconds_until_consuming(name, healed, timeout_s=45)
    print(f"{broker_kind}: consuming again {recovered:.1f} s after its connections went half open")
    assert worker.alive() and recovered < 30
    fleet.settle(120)
    fleet.check_ledger()


def test_a_worker_told_to_stop_on_a_half_open_connection_exits(half_open_fleet, broker_kind):
    """SIGTERM right after the broker connections went half open: the warm shutdown ends
    within its drain time (Redis: kombu's channel close waited forever for a BRPOP reply on
    such a socket), and every job still ends."""
    fleet, worker, name, proxy = half_open_fleet
    fleet.submit_many(24)
    fleet.wait_until(lambda: fleet.ran_on(name), 30, f"{name} running jobs")
    proxy.half_open()
    told = time.monotonic()
    worker.signal(signal.SIGTERM)
    deadline = told + STOP_WITHIN_S + 30
    while worker.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    took = time.monotonic() - told
    print(f"{broker_kind}: stopped {took:.1f} s after SIGTERM on a half-open connection")
    assert not worker.alive(), f"{name} still running {took:.0f} s after SIGTERM:\n{worker.log()[-3000:]}"
    assert took < STOP_WITHIN_S
    fleet.settle(120)
    fleet.check_ledger()
