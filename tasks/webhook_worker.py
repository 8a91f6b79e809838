"""The webhook delivery worker: the shared Celery app, consuming only FLEET_WEBHOOK_QUEUE,
and the task that makes each attempt. ``fleet hooks`` runs it (``celery -A
tasks.webhook_worker worker``).

It imports nothing outside ``tasks/`` (no torch, no Flask): it starts in a second, needs no
GPU, and its threads pool has FLEET_WEBHOOK_THREADS attempts waiting on slow receivers at
once without holding up a single job.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict
from typing import Any

from celery import Celery, Task

from tasks import probes
from tasks.celery import WEBHOOK_TASK, make_celery, use_threads_pool
from tasks.logs import install_celery_logging
from tasks.settings import Settings, get_settings
from tasks.webhooks import WebhookDelivery, attempt


def max_hop_s(settings: Settings) -> float:
    """The longest one message waits for its delivery's next attempt. On the Redis broker a
    message with a countdown is handed to a worker at once and held there, unacknowledged,
    until it is due; held past the visibility timeout, Redis hands it out again while the
    first worker still holds it, and the attempt runs twice (each of those retries twice
    again, and so on). Half the visibility timeout leaves the held message room to run and
    be acknowledged in time; a longer backoff is waited in hops: the message comes back,
    finds the delivery not yet due and goes out again for the rest of the wait. (On
    RabbitMQ the broker itself holds the countdown, through the topic exchange job_queue
    gives every queue; a hop there costs one message.)"""
    return settings.visibility_timeout_s / 2


def make_hooks_app(settings: Settings) -> Celery:
    """The webhook worker's app: the shared configuration, a threads pool, only the webhook
    queue, the delivery task, and the readiness probe's signals."""
    install_celery_logging(settings.log_format, "hooks")
    app = make_celery(settings)
    use_threads_pool(app, settings.webhook_threads)
    app.amqp.queues.select([settings.webhook_queue])
    probes.connect()  # the ready file a Kubernetes readiness probe reads (tasks/probes.py)

    @app.task(name=WEBHOOK_TASK, bind=True, max_retries=None)
    def deliver_webhook(self: Task[Any, None], message: dict[str, Any]) -> None:
        """One attempt when the delivery is due, then, unless it is over, the same delivery
        again as a new message with a countdown (``self.retry``: the message is republished
        before this one is acknowledged, so a worker that dies in between loses nothing;
        receivers deduplicate the rare second attempt by ``webhook-id``)."""
        delivery = WebhookDelivery(**message)
        if delivery.due_at <= time.time():
            retry = attempt(delivery, settings)
            if retry is None:
                return
            delivery = retry
        # Whole seconds, at least one: RabbitMQ's native delayed delivery routes a countdown by
        # its whole seconds and refuses zero (rounding down would bring the message back early).
        countdown = max(1, math.ceil(min(delivery.due_at - time.time(), max_hop_s(settings))))
        # argsrepr is a message option retry passes on (Flower shows it); celery-types omits it.
        raise self.retry(
            args=(asdict(delivery),),
            countdown=countdown,
            argsrepr=delivery.argsrepr(),  # type: ignore[call-arg]
        )

    return app


@functools.cache
def hooks_app() -> Celery:
    return make_hooks_app(get_settings())


def __getattr__(name: str) -> Celery:
    """``app``, what ``celery -A tasks.webhook_worker`` looks for: made when first asked for,
    never as a side effect of an import."""
    if name == "app":
        return hooks_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
