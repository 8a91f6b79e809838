"""A fleet to break: real Redis, RabbitMQ and S3 processes that tests stop, kill and
restart, workers on the simulated model (batches take real time, so a kill lands
mid-batch), and a ledger that proves every accepted job reached a terminal state."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fleet.stack import RedisServer, s3_env, start_s3
from tests.ledger import Broker, FaultFleet, fault_fleet_env
from tests.stack import RabbitMQ, rabbitmq_available

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
            **fault_fleet_env(
                "faults",
                FLEET_VISIBILITY_TIMEOUT_S="6",
                FLEET_RETRY_WINDOW_S="20",
                FLEET_REPUBLISH_AFTER_S="8",
                FLEET_PUBLISH_TIMEOUT_S="1",
            ),
            **env,
        }
        fleet = FaultFleet(fault_dir, fleet_env, broker, s3_server)
        fleets.append(fleet)
        return fleet

    yield build
    for fleet in fleets:
        fleet.stop()
