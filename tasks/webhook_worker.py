"""The webhook delivery worker: the shared Celery app, consuming only FLEET_WEBHOOK_QUEUE,
and the task that makes each attempt. ``fleet hooks`` runs it (``celery -A
tasks.webhook_worker worker``).

It imports nothing outside ``tasks/`` (no torch, no Flask): it starts in a second, needs no
GPU, and its threads pool has FLEET_WEBHOOK_THREADS attempts waiting on slow receivers at
once without holding up a single job.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict

from tasks import probes
from tasks.celery import WEBHOOK_TASK, app
from tasks.settings import get_settings
from tasks.webhooks import WebhookDelivery, attempt

_settings = get_settings()
app.conf.update(
    worker_pool="threads",
    worker_concurrency=_settings.webhook_threads,
    worker_prefetch_multiplier=1,
)
app.amqp.queues.select(_settings.webhook_queue)
probes.connect()  # the ready file a Kubernetes readiness probe reads (tasks/probes.py)

#: The longest one message waits for its delivery's next attempt. On the Redis broker a
#: message with a countdown is handed to a worker at once and held there, unacknowledged,
#: until it is due; held past the visibility timeout, Redis hands it out again while the
#: first worker still holds it, and the attempt runs twice (each of those retries twice
#: again, and so on). Half the visibility timeout leaves the held message room to run and
#: be acknowledged in time; a longer backoff is waited in hops: the message comes back,
#: finds the delivery not yet due and goes out again for the rest of the wait. (On
#: RabbitMQ the broker itself holds the countdown, through the topic exchange job_queue
#: gives every queue; a hop there costs one message.)
MAX_HOP_S = _settings.visibility_timeout_s / 2


@app.task(name=WEBHOOK_TASK, bind=True, max_retries=None)
def deliver_webhook(self, message: dict) -> None:
    """One attempt when the delivery is due, then, unless it is over, the same delivery
    again as a new message with a countdown (``self.retry``: the message is republished
    before this one is acknowledged, so a worker that dies in between loses nothing;
    receivers deduplicate the rare second attempt by ``webhook-id``)."""
    delivery = WebhookDelivery(**message)
    if delivery.due_at <= time.time():
        delivery = attempt(delivery, _settings)
        if delivery is None:
            return
    # Whole seconds, at least one: RabbitMQ's native delayed delivery routes a countdown by
    # its whole seconds and refuses zero (rounding down would bring the message back early).
    countdown = max(1, math.ceil(min(delivery.due_at - time.time(), MAX_HOP_S)))
    raise self.retry(args=[asdict(delivery)], countdown=countdown)
