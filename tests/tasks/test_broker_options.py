"""The broker options that let a worker ride out a partition (tests/partitions measures
them): each bound derives from FLEET_BROKER_HEARTBEAT_S or FLEET_PUBLISH_TIMEOUT_S."""

from __future__ import annotations

import socket
from unittest import mock

from celery.worker.consumer import Consumer as CeleryConsumer

from tasks.celery import broker_options, make_celery
from tasks.consumer import RECONNECT_MAX_S, Consumer
from tasks.settings import Settings


def test_rabbitmq_gives_up_on_a_silent_connection_after_two_heartbeats():
    """Reads, writes and unacknowledged data on RabbitMQ are bounded by two heartbeats."""
    options = broker_options(Settings(broker_url="amqp://guest:guest@127.0.0.1:5672//", broker_heartbeat_s=7))
    assert options["confirm_publish"] is True
    assert options["read_timeout"] == options["write_timeout"] == 14
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        assert options["socket_settings"] == {socket.TCP_USER_TIMEOUT: 14_000}


def test_redis_checks_its_consuming_connections_and_bounds_blocking_reads():
    """The Redis transport pings every heartbeat and a blocking read waits the publish timeout."""
    options = broker_options(Settings(broker_heartbeat_s=7, publish_timeout_s=2.5))
    assert options["health_check_interval"] == 7
    assert options["socket_timeout"] == 2.5
    assert options["socket_keepalive"] is True


def test_every_worker_reconnects_often_and_keeps_no_exclusive_control_queue():
    """The app's workers run the fleet's consumer, with a heartbeat, and a control queue that
    a reconnect after a partition can take over (an exclusive one ended the worker)."""
    app = make_celery(Settings(broker_heartbeat_s=7))
    assert app.conf.worker_consumer == "tasks.consumer:Consumer"
    assert app.conf.broker_heartbeat == 7
    assert app.conf.control_queue_exclusive is False
    assert issubclass(Consumer, CeleryConsumer) and RECONNECT_MAX_S <= 5


def test_a_worker_never_waits_to_mingle():
    """Celery's Mingle step asks the other workers for revoked task ids at every connection
    and waits a second for answers; the fleet revokes nothing, so its consumer skips it,
    whatever the worker's command line."""
    app = make_celery(Settings())
    consumer = Consumer(lambda *args: None, app=app, hostname="w@h", timer=mock.Mock(), controller=mock.Mock())
    steps = {type(step).__name__: step.enabled for step in consumer.blueprint.steps.values()}
    assert steps["Mingle"] is False and steps["Tasks"] is True
