"""A fleet spread over simulated hosts: Redis (job store), the broker (a Redis of its own,
or RabbitMQ) and the S3 server on the services' address, each worker and, where a test
needs it, the API in a network namespace of its own, so a test can cut, slow or degrade one
host's link while the rest of the fleet goes on."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from fleet.processes import Server, free_port, wait_for
from fleet.stack import RedisServer, S3Server, settings_from_env, start_s3
from tasks.jobs import JobState
from tasks.storage import make_s3_client
from tests.ledger import Broker, FaultFleet, fault_fleet_env
from tests.partitions.net import Host, Network, unavailable
from tests.partitions.proxy import FaultProxy
from tests.stack import RabbitMQ, rabbitmq_available

BROKERS = ["redis", "rabbitmq"]


def pytest_generate_tests(metafunc):
    if "broker_kind" in metafunc.fixturenames:
        metafunc.parametrize("broker_kind", BROKERS, scope="module")


def _required(reason: str | None) -> None:
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the partition suite: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def network() -> Iterator[Network]:
    _required(unavailable())
    net = Network()
    yield net
    net.close()


@pytest.fixture(scope="module")
def part_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("partitions")


@dataclass
class Services:
    """What runs on the services' address, for one broker."""

    store: RedisServer
    broker: Broker
    s3: S3Server
    env: dict[str, str]

    @property
    def broker_port(self) -> int:
        return self.broker.port

    @property
    def store_port(self) -> int:
        return self.store.port

    @property
    def s3_port(self) -> int:
        return int(self.env["FLEET_S3_ENDPOINT_URL"].rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def services(network, part_dir, broker_kind) -> Iterator[Services]:
    ip = network.service_ip
    store = RedisServer(part_dir, appendonly=True, host=ip).start()
    stopped = [store]
    if broker_kind == "rabbitmq":
        _required(None if rabbitmq_available() else "rabbitmq-server is not installed")
        rabbit = RabbitMQ(part_dir, host=ip).start()
        broker = Broker("rabbitmq", store, rabbit)
        stopped.append(rabbit)
    else:
        # A Redis of its own, so a test can cut the broker and leave the job store up.
        broker_redis = RedisServer(part_dir, appendonly=True, host=ip).start()
        broker = Broker("redis", broker_redis, None)
        stopped.append(broker_redis)
    env = {
        "FLEET_S3_ENDPOINT_URL": f"http://{ip}:{free_port()}",
        "FLEET_S3_BUCKET": "fleet-partitions",
        "FLEET_STATE_DIR": str(part_dir / "state"),
        "FLEET_REDIS_URL": store.url,
        "FLEET_BROKER_URL": broker.url,
    }
    s3 = start_s3(part_dir, env)
    # Every version of every key kept: a second upload of different bytes is seen.
    make_s3_client(settings_from_env(env)).put_bucket_versioning(
        Bucket=env["FLEET_S3_BUCKET"], VersioningConfiguration={"Status": "Enabled"}
    )
    yield Services(store, broker, s3, env)
    s3.stop()
    for server in stopped:
        server.stop()


class PartitionFleet(FaultFleet):
    """A fault fleet whose workers and API run on hosts of their own."""

    def __init__(self, work_dir: Path, env: dict[str, str], services: Services, network: Network):
        super().__init__(work_dir, env, services.broker, services.s3)
        self.services = services
        self.network = network
        self.hosts: dict[str, Host] = {}
        self.proxies: list[FaultProxy] = []

    def start_worker_on_host(self, **env: str) -> tuple[Server, str, Host]:
        """A worker on a host of its own; returns it, its Celery name and its host."""
        host = self.network.host()
        name = f"worker-{host.ns}"
        worker = self.start_worker(name, prefix=host.command([]), **env)
        self.hosts[name] = host
        return worker, name, host

    def through_proxies(self, *settings: str) -> tuple[dict[str, str], list[FaultProxy]]:
        """Settings (``FLEET_BROKER_URL``, ``FLEET_REDIS_URL``, ``FLEET_S3_ENDPOINT_URL``)
        that reach their service through a proxy of their own, and the proxies."""
        env: dict[str, str] = {}
        proxies = []
        for setting in settings:
            url = urlsplit(self.env[setting])
            assert url.hostname is not None and url.port is not None
            proxy = FaultProxy((url.hostname, url.port), listen_host=url.hostname).start()
            self.proxies.append(proxy)
            proxies.append(proxy)
            env[setting] = urlunsplit(url._replace(netloc=url.netloc.replace(f":{url.port}", f":{proxy.address[1]}")))
        return env, proxies

    def stop(self) -> None:
        super().stop()
        for proxy in self.proxies:
            proxy.close()

    def start_api_on_host(self, **env: str) -> Host:
        host = self.network.host()
        self.start_api(prefix=host.command([]), FLEET_API_HOST=host.ip, **env)
        return host

    def conflicting_images(self) -> list[str]:
        """Image keys stored more than once with different contents (the bucket keeps
        every version)."""
        s3 = make_s3_client(self.settings)
        etags: dict[str, set[str]] = {}
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=self.settings.s3_bucket, Prefix="jobs/"):
            for version in page.get("Versions", []):
                etags.setdefault(version["Key"], set()).add(version["ETag"])
        return sorted(key for key, tags in etags.items() if len(tags) > 1)

    def ran_on(self, name: str, among: list[str] | None = None) -> set[str]:
        """The jobs (accepted ones, or ``among``) that ``name`` finished."""
        done = set()
        for job_id in self.ledger.accepted if among is None else among:
            job = self.store.get(job_id)
            if job is not None and job.state is JobState.SUCCEEDED and (job.worker or "").startswith(f"{name}@"):
                done.add(job_id)
        return done

    def seconds_until_consuming(self, name: str, since: float, timeout_s: float = 60) -> float:
        """Submit small bursts until ``name`` finishes one of them (so it took a message
        after ``since``, a ``time.monotonic``); the seconds from ``since`` until then."""
        fresh: list[str] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            fresh += self.submit_many(8)
            try:
                wait_for(functools.partial(self.ran_on, name, list(fresh)), 1.0, name)
                return time.monotonic() - since
            except TimeoutError:
                continue
        raise AssertionError(f"{name} consumed nothing within {timeout_s:g} s")


@pytest.fixture
def make_fleet(network, services, part_dir) -> Iterator:
    fleets: list[PartitionFleet] = []

    def build(**env: str) -> PartitionFleet:
        fleet_env = {
            **services.env,
            **fault_fleet_env(
                "partitions",
                FLEET_VISIBILITY_TIMEOUT_S="10",
                FLEET_RETRY_WINDOW_S="30",
                FLEET_REPUBLISH_AFTER_S="15",
                FLEET_PUBLISH_TIMEOUT_S="2",
            ),
            **env,
        }
        fleet = PartitionFleet(part_dir, fleet_env, services, network)
        fleets.append(fleet)
        return fleet

    yield build
    for fleet in fleets:
        fleet.stop()
