"""The Celery app both sides share, and the one way a job is published.

``make_celery(settings)`` makes the app every process configures alike (queues,
serializer, acks, broker options); the GPU worker (``workers.celery``) and the webhook
worker (``tasks.webhook_worker``) each make their own from it and add their pool, tasks and
signals. Importing this module makes no app and reads no setting: ``celery -A tasks``
(Flower) finds ``app`` here, made on first access (``__getattr__``).

Messages carry only a job id: the job itself lives in the job store. A webhook delivery's
message carries the delivery itself (``tasks.webhooks``).
"""

from __future__ import annotations

import functools
import socket
from typing import Any

import redis
from celery import Celery
from kombu import Exchange, Queue
from kombu.exceptions import KombuError, OperationalError

from tasks.errors import DependencyUnavailable
from tasks.registry import load_registry
from tasks.request import MAX_PRIORITY
from tasks.settings import Settings, get_settings

GENERATE_TASK = "fleet.generate"
WEBHOOK_TASK = "fleet.webhook"


def job_queue(settings: Settings, name: str) -> Queue:
    """A durable queue; on RabbitMQ a quorum queue (replicated, redelivery-safe).

    A topic exchange: Celery's native delayed delivery (countdown retries on quorum
    queues) cannot route through a direct one.
    """
    if settings.broker_is_amqp:
        return Queue(
            name,
            Exchange(name, type="topic", durable=True),
            routing_key=name,
            durable=True,
            queue_arguments={"x-queue-type": "quorum"},
        )
    return Queue(name, routing_key=name)


def broker_options(settings: Settings) -> dict[str, Any]:
    if settings.broker_is_amqp:
        dead_after_s = 2 * settings.broker_heartbeat_s
        options: dict[str, Any] = {
            # Publisher confirms: send_task returns only once RabbitMQ has the message.
            "confirm_publish": True,
            "connect_timeout": settings.publish_timeout_s,
            # A blocking read on a connection a partition left half open (a confirm that
            # never comes, the close at shutdown) gives up after two heartbeats: the worker's
            # event publisher waited forever for one and held its whole consumer loop.
            "read_timeout": dead_after_s,
            "write_timeout": dead_after_s,
        }
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            # Unacknowledged data fails the connection after two heartbeats too, not after
            # py-amqp's 1 s, which a slow, lossy link exceeds without being down.
            options["socket_settings"] = {socket.TCP_USER_TIMEOUT: dead_after_s * 1000}
        return options
    return {
        # A partition can leave the connection half open: no reply ever comes and no error
        # either. The transport pings its consuming connections every heartbeat and drops one
        # whose reply is overdue; a blocking read (a publish, the BRPOP a closing channel
        # still waits for at shutdown) gives up after the publish timeout.
        "health_check_interval": settings.broker_heartbeat_s,
        "socket_timeout": settings.publish_timeout_s,
        "socket_keepalive": True,
        # A message reserved by a worker that died comes back after this long: it must
        # exceed the longest a message can stay reserved (prefetch wait + batch + retries).
        "visibility_timeout": settings.visibility_timeout_s,
        # kombu scans for such messages every interval x throttle seconds (100 s by
        # default): scan often enough that they resume soon after the timeout.
        "unacked_restore_interval": min(60, max(1, settings.visibility_timeout_s // 4)),
        "unacked_restore_throttle": 1,
        "socket_connect_timeout": settings.publish_timeout_s,
        # One list per priority (``<queue>:<n>``, 0 first): a job's priority within its
        # queue (``redis_priority``).
        "priority_steps": list(range(MAX_PRIORITY + 1)),
        "sep": PRIORITY_SEP,
    }


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("fleet", broker=settings.effective_broker_url, set_as_current=False)
    queues = [job_queue(settings, name) for name in load_registry(settings).job_queues]
    if settings.webhook_queue in {queue.name for queue in queues}:
        raise ValueError(f"FLEET_WEBHOOK_QUEUE '{settings.webhook_queue}' must not be a job queue")
    queues.append(job_queue(settings, settings.webhook_queue))
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        # Acknowledge after the images are stored and the record is final, and hand the
        # message back if the worker process dies: a killed worker loses nothing.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Job state lives in our own store, not in a result backend.
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        # Flower sees every job as its own task.
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        task_default_queue=settings.queue,
        task_queues=queues,
        task_routes={WEBHOOK_TASK: {"queue": settings.webhook_queue}},
        task_create_missing_queues=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker outlives a broker restart
        broker_transport_options=broker_options(settings),
        broker_connection_timeout=settings.publish_timeout_s,
        # RabbitMQ: both ends drop a connection that stayed silent two heartbeats, so a
        # partition is noticed within seconds instead of Celery's two minutes.
        broker_heartbeat=settings.broker_heartbeat_s,
        # The worker's remote-control queue (``<name>.celery.pidbox``) is not exclusive: after
        # a partition the worker reconnects while RabbitMQ still holds its old connection, and
        # an exclusive queue then answers RESOURCE_LOCKED, which ends the worker process.
        control_queue_exclusive=False,
        # Reconnects every few seconds after a partition, not Celery's up to 30 s.
        worker_consumer="tasks.consumer:Consumer",
    )
    # Declared with the others, so whoever publishes first creates it right (a quorum queue
    # on RabbitMQ), but consumed only by the worker that selects it (`fleet hooks`): a GPU
    # worker has no webhook task and would drop its messages.
    app.amqp.queues.deselect([settings.webhook_queue])
    return app


PRIORITY_SEP = ":"


def redis_priority(priority: int) -> int:
    """The API's priority (0-9, higher sooner) as the Redis transport's (0 first). On
    RabbitMQ the API's value is sent as it is: higher is sooner there, on a queue that
    supports priorities (quorum queues before RabbitMQ 4.0 ignore them)."""
    return MAX_PRIORITY - priority


def queued_messages(client: redis.Redis, queue: str) -> int:
    """Messages waiting in a Redis-broker queue, over all its priority lists."""
    names = [queue] + [f"{queue}{PRIORITY_SEP}{n}" for n in range(1, MAX_PRIORITY + 1)]
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.llen(name)
        return sum(pipe.execute())


def publish_job(celery_app: Celery, job_id: str, queue: str, publish_timeout_s: float, priority: int = 0) -> None:
    """Send the job's message, or raise ``DependencyUnavailable`` within a bounded time.

    The Celery task id is the job id: Flower lists each job under the id its client knows,
    and Celery's own log lines name it. A republished message (``tasks.submit.publish``)
    shares that id: Flower shows one task, with the latest delivery's events.
    """
    amqp = celery_app.conf.broker_url.startswith(("amqp", "pyamqp"))
    try:
        celery_app.send_task(
            GENERATE_TASK,
            args=[job_id],
            task_id=job_id,
            queue=queue,
            priority=priority if amqp else redis_priority(priority),
            # A publish on a connection a partition left open waits no longer for its confirm.
            confirm_timeout=publish_timeout_s if amqp else None,
            retry=True,
            retry_policy={
                "max_retries": 2,
                "interval_start": 0,
                "interval_step": publish_timeout_s / 4,
                "interval_max": publish_timeout_s / 2,
            },
        )
    except (OperationalError, KombuError, OSError, redis.RedisError) as exc:
        raise DependencyUnavailable("broker", str(exc)) from exc


def use_threads_pool(app: Celery, threads: int) -> None:
    """Run the worker's tasks on ``threads`` threads that mostly wait (on the runner, on a
    webhook receiver). The threads pool reserves concurrency x multiplier messages, so the
    multiplier is 1: ``threads`` is the prefetch."""
    app.conf.update(worker_pool="threads", worker_concurrency=threads, worker_prefetch_multiplier=1)


@functools.cache
def shared_app() -> Celery:
    """The app of a process that only publishes and inspects (Flower, ``fleet up``)."""
    return make_celery()


def __getattr__(name: str) -> Celery:
    """``tasks.celery.app``, what ``celery -A tasks`` looks for, made when first asked for."""
    if name == "app":
        return shared_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def declare_queues(celery_app: Celery, timeout_s: float) -> None:
    """Declare every queue of the app, consumed here or not.

    A worker declares only the queues it consumes, but on RabbitMQ binds every queue of the
    app to Celery's native delayed-delivery exchanges when its consumer starts: the webhook
    queue, which the GPU worker publishes to and never consumes, failed that binding until
    `fleet hooks` had first declared it ("no exchange 'fleet.webhooks'"), and the worker
    then ran without delayed delivery.
    """
    with celery_app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout_s)  # type: ignore[arg-type]
        for queue in celery_app.amqp.queues.values():
            queue.bind(conn.default_channel).declare()


def ping_broker(celery_app: Celery, timeout_s: float) -> None:
    try:
        with celery_app.connection_for_write() as conn:
            # kombu takes a float here; celery-types says int.
            conn.ensure_connection(
                max_retries=1,
                interval_start=0,
                interval_step=0,
                timeout=timeout_s,  # type: ignore[arg-type]
            )
    except Exception as exc:  # kombu raises transport-specific errors here
        raise DependencyUnavailable("broker", str(exc)) from exc
