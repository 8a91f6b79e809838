"""The Celery consumer every fleet worker runs (``worker_consumer``): Celery's own, made to
ride out partitions (measured in tests/partitions, docs/RELIABILITY.md):

- After losing the broker it tries again at least every ``RECONNECT_MAX_S`` seconds.
  Celery backs off 2, 4, 6 ... up to 30 s between attempts, so a worker whose link was cut
  for a minute sat idle up to half a minute after the heal. An attempt while the broker is
  unreachable costs one connect, bounded by ``FLEET_PUBLISH_TIMEOUT_S``.
- Its monitoring events (what Flower shows) go out without publisher confirms. The event
  dispatcher publishes from the consumer's own loop: waiting for a confirm there, on a
  connection a partition left half open, held the loop (and with it the heartbeat check
  that notices the dead connection) for a read timeout at every event.
- When the consumer's connection fails, every other connection the worker holds to the
  same broker (its event dispatcher's, the app's connection and producer pools) is dropped
  too, without a word to the broker: after a partition they are as dead as the consumer's,
  and the restart's first broadcast (mingle) waited on them.
- It never mingles. At every connection, the first and each after a reconnect, Celery's
  Mingle step broadcasts to the other workers and waits a second for their revoked task
  ids and logical clocks. The fleet revokes nothing (a cancel lives in the job store), so
  that second bought nothing: it was a second of every worker start and every heal.
- A warm shutdown first checks, in one round trip bounded by ``FLEET_PUBLISH_TIMEOUT_S``,
  that the broker still answers. If it does not, every broker socket is bounded to
  ``DEAD_SOCKET_TIMEOUT_S`` before the shutdown cancels consumers and closes channels, one
  synchronous call after another: each waited a read timeout on a half-open connection,
  and the worker still ran a minute after SIGTERM. The broker hands back what the worker
  had not acknowledged when it drops the dead connection (the job store refuses to finish
  a job twice). A broker that answers keeps Celery's unbounded warm shutdown, so that acks
  in flight are not cut off.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from celery.utils.threads import bound_open_broker_sockets  # type: ignore[attr-defined]  # Celery 5.7, newer than its stubs
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu import Connection, pools

log = logging.getLogger(__name__)

RECONNECT_MAX_S = 5
#: A broker socket's timeout once the broker is known not to answer: the shutdown's calls
#: on it fail at once instead of each waiting out the read timeout.
DEAD_SOCKET_TIMEOUT_S = 0.1


class Consumer(CeleryConsumer):
    def __init__(self, on_task_request: Any, worker_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        # What ``celery worker --without-mingle`` sets, whatever the command line says.
        options = {**(worker_options or {}), "without_mingle": True}
        super().__init__(on_task_request, worker_options=options, **kwargs)

    def ensure_connected(self, conn: Any) -> Any:
        # Celery calls ``conn.ensure_connection`` with kombu's default intervals; this
        # connection object is the consumer's own, made for this one call.
        conn.ensure_connection = functools.partial(
            conn.ensure_connection, interval_start=1, interval_step=1, interval_max=RECONNECT_MAX_S
        )
        return super().ensure_connected(conn)

    def connection_for_write(self, url: str | None = None, heartbeat: float | None = None) -> Any:
        # The consumer's only write connection is its event dispatcher's (celery's Events step).
        options = {"confirm_publish": False} if self.app.conf.broker_transport_options.get("confirm_publish") else {}
        conn = self.app.connection_for_write(url=url, heartbeat=heartbeat, transport_options=options)
        return self.ensure_connected(conn)

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        super().on_connection_error_after_connected(exc)
        dispatcher = _dispatcher(self)
        if dispatcher is not None and dispatcher.connection is not None:
            _collect(dispatcher.connection)  # Events.start closes it next: now without I/O
        reset_pools(self.app)

    def stop(self) -> None:
        connection = self.connection
        if connection is not None and _is_amqp(connection):
            if not broker_answers(connection, self.app.conf.broker_connection_timeout):
                log.warning("warm shutdown: the broker does not answer; not waiting for it")
                self._bound_broker_sockets(DEAD_SOCKET_TIMEOUT_S)
        super().stop()

    def _bound_broker_sockets(self, timeout_s: float) -> None:
        connections = [self.connection]
        dispatcher = _dispatcher(self)
        if dispatcher is not None:
            connections.append(dispatcher.connection)
        pool = getattr(self.app, "_pool", None)  # the public property would make one
        if pool is not None:
            connections += [*pool._dirty, *pool._resource.queue]
        for connection in connections:
            if isinstance(connection, Connection):
                bound_open_broker_sockets(connection, timeout_s)


def broker_answers(connection: Connection, timeout_s: float) -> bool:
    """Whether the broker answers on ``connection`` (py-amqp) within ``timeout_s``: one
    channel opened and closed, each a round trip. Never dials: an unset connection is dead."""
    raw = getattr(connection, "_connection", None)  # the public property would connect
    sock = getattr(getattr(raw, "_transport", None), "sock", None)
    if raw is None or sock is None:
        return False
    previous = sock.gettimeout()
    errors: tuple[type[BaseException], ...] = (OSError, *connection.connection_errors, *connection.channel_errors)
    try:
        sock.settimeout(timeout_s)
        raw.channel().close()
        return True
    except errors:
        return False
    finally:
        try:
            sock.settimeout(previous)
        except OSError:
            pass


def reset_pools(app: Any) -> None:
    """Drop every connection and producer pool of this process (as Celery does after a fork):
    kombu's registries, which the app's pools are entries of, and the references the app and
    its remote-control mailbox keep to them. Each pooled connection, in use or not, is
    collected (closed without I/O); the next publish makes new pools."""
    app._pool = None
    amqp = app.__dict__.get("amqp")
    if amqp is not None:
        amqp._producer_pool = None
    control = app.__dict__.get("control")
    if control is not None:
        control.mailbox.__dict__.pop("producer_pool", None)
    pools.reset()


def _dispatcher(consumer: CeleryConsumer) -> Any:
    """The consumer's event dispatcher (set by Celery's Events step), if it has one."""
    return getattr(consumer, "event_dispatcher", None)


def _collect(connection: Connection) -> None:
    bound_open_broker_sockets(connection, DEAD_SOCKET_TIMEOUT_S)
    try:
        connection.collect()
    except Exception:  # best effort: it is being dropped
        pass


def _is_amqp(connection: Connection) -> bool:
    try:
        return connection.transport.driver_type == "amqp"
    except AttributeError:
        return False
