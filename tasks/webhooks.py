"""Webhooks: a signed POST to the client's URL at each event of its job.

The contract (docs/WEBHOOKS.md is the receiver's side of it):

- Events are ``start``, ``progress`` and ``completed``; the body is
  ``{"type": <event>, "timestamp": <the event's ISO-8601 UTC time>, "data": {...}}``, the
  same bytes on every attempt.
- Headers follow Standard Webhooks: ``webhook-id`` is the delivery id, the same on every
  retry (receivers deduplicate by it: delivery is at least once); ``webhook-timestamp`` is
  this attempt's Unix time and ``webhook-signature`` is ``v1,<base64 HMAC-SHA256>`` of
  ``<id>.<timestamp>.<body>``, both made afresh for every attempt. The key is the owner's
  secret ``whsec_...``, derived from ``FLEET_WEBHOOK_SIGNING_KEY`` and the owner's name, so
  nothing is stored and the API can show it.
- ``send_webhook`` only publishes a message: the API and the GPU workers never wait for a
  receiver, and a broker that is down loses the webhook, never the job. ``fleet hooks``
  (``tasks.webhook_worker``) makes the attempts: to public addresses only
  (``tasks.destinations``), never following a redirect, retrying with exponential backoff
  until ``FLEET_WEBHOOK_RETRY_WINDOW_S`` after the first attempt.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from celery import Celery

from tasks.celery import WEBHOOK_TASK
from tasks.destinations import check_address, open_connection, parse_url, resolve_destination
from tasks.errors import ValidationFailed
from tasks.settings import Settings

log = logging.getLogger(__name__)

EVENTS = ("start", "progress", "completed")
SECRET_PREFIX = "whsec_"
USER_AGENT = "diffusion-fleet-webhooks/1"
#: A delivery id travels as a header value: a token, never a line break.
DELIVERY_ID = re.compile(r"[A-Za-z0-9_.:-]{1,200}")
#: The longest wait between two attempts: past a few hours of doubling, hourly is enough.
MAX_BACKOFF_S = 3600.0


@dataclass(frozen=True)
class WebhookDelivery:
    """One event on its way to one URL: the message ``fleet hooks`` consumes, carrying all
    an attempt needs (no job store), and updated by each failed attempt."""

    id: str
    url: str
    owner: str
    event: str
    data: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0  # when the event happened: the body's timestamp
    attempts: int = 0
    first_attempt_at: float | None = None
    due_at: float = 0.0  # no attempt before this time (the backoff)

    def argsrepr(self) -> str:
        """What task events (and so Flower) show for the message's arguments: its ids, not
        its data, which holds the job's prompt and presigned image URLs."""
        return repr([{"id": self.id, "event": self.event, "attempts": self.attempts}])

    def body(self) -> bytes:
        moment = datetime.fromtimestamp(self.created_at, timezone.utc).isoformat(timespec="milliseconds")
        payload = {"type": self.event, "timestamp": moment.replace("+00:00", "Z"), "data": self.data}
        return json.dumps(payload, separators=(",", ":")).encode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks ``v1`` signature of one attempt."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(
    secret: str, headers: Mapping[str, str], body: bytes, tolerance_s: float = 300, now: float | None = None
) -> bool:
    """Whether a request carries a valid signature of ``body`` by ``secret``, made within
    ``tolerance_s`` of ``now`` (an old one may be a replay). The header may hold several
    space-separated signatures (a secret being rotated); one valid ``v1`` is enough."""
    lowered = {name.lower(): value for name, value in headers.items()}
    msg_id, signatures = lowered.get("webhook-id", ""), lowered.get("webhook-signature", "")
    try:
        timestamp = int(lowered.get("webhook-timestamp", ""))
    except ValueError:
        return False
    if not msg_id or abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, msg_id, timestamp, body).encode()
    return any(hmac.compare_digest(expected, candidate.encode()) for candidate in signatures.split())


def webhook_secret(settings: Settings, owner: str) -> str:
    """The secret ``owner``'s webhooks are signed with: derived, not stored, so every process
    with the signing key agrees on it."""
    digest = hmac.new(settings.webhook_signing_key.encode(), owner.encode(), hashlib.sha256).digest()
    return SECRET_PREFIX + base64.b64encode(digest).decode()


def check_webhook_url(url: str, settings: Settings) -> None:
    """What can be checked when a job is submitted, without resolving anything: an http(s)
    URL with a host, at most 2048 characters, and not a forbidden literal IP address.
    Raises ``ValidationFailed`` (field ``webhook``). Names are checked at each attempt,
    after they resolve."""
    host = parse_url(url).hostname or ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return  # a name: checked at each attempt, once it resolves
    check_address(host, host, settings.webhook_allow_private)


def send_webhook(
    celery_app: Celery,
    settings: Settings,
    *,
    url: str,
    owner: str,
    event: str,
    data: dict[str, Any],
    delivery_id: str,
) -> None:
    """Publish one delivery for ``fleet hooks``. Waits at most about FLEET_PUBLISH_TIMEOUT_S
    for the broker and never raises for it: a lost webhook is logged, and the job goes on."""
    if event not in EVENTS:
        raise ValueError(f"webhook event '{event}': expected one of {', '.join(EVENTS)}")
    if not DELIVERY_ID.fullmatch(delivery_id):
        raise ValueError(f"webhook delivery id '{delivery_id}': expected 1-200 of A-Z a-z 0-9 _ . : -")
    delivery = WebhookDelivery(id=delivery_id, url=url, owner=owner, event=event, data=data, created_at=time.time())
    try:
        celery_app.send_task(
            WEBHOOK_TASK,
            args=[asdict(delivery)],
            argsrepr=delivery.argsrepr(),
            queue=settings.webhook_queue,
            retry=True,
            retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0, "interval_max": 0},
        )
    except Exception as exc:  # whatever the broker's transport raises: the job must not fail for it
        log.warning("webhook %s (%s) to %s lost: the broker did not take it: %s", delivery_id, event, url, exc)


def deliver(delivery: WebhookDelivery, settings: Settings) -> int:
    """One attempt: POST the body, signed now, to the address the URL's host resolves to
    (checked, and connected to without resolving again). Returns the HTTP status; a redirect
    is returned, never followed. Raises ``ValidationFailed`` for a URL that can never be
    sent to (``ForbiddenDestination`` included), ``OSError`` or ``HTTPException`` for a
    failure worth retrying."""
    destination = resolve_destination(delivery.url, settings.webhook_allow_private)
    body, timestamp = delivery.body(), int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "webhook-id": delivery.id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(webhook_secret(settings, delivery.owner), delivery.id, timestamp, body),
    }
    connection = open_connection(destination, settings.webhook_timeout_s)
    try:
        connection.request("POST", destination.target, body=body, headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


def backoff_s(attempts: int, base_s: float, rng: Callable[[], float] = random.random) -> float:
    """The wait after ``attempts`` failed attempts: ``base_s`` doubling up to an hour, less
    up to half of it at random, so receivers that failed together are not retried together."""
    return min(MAX_BACKOFF_S, base_s * 2.0 ** (attempts - 1)) * (1 - rng() / 2)


def attempt(
    delivery: WebhookDelivery, settings: Settings, rng: Callable[[], float] = random.random
) -> WebhookDelivery | None:
    """Make one attempt and log its outcome. Returns the delivery to try again (``due_at``
    set) or ``None`` when it is over: delivered (2xx), gone (410: the receiver says the
    endpoint no longer exists), never sendable, or out of its retry window."""
    started = time.time()
    first = delivery.first_attempt_at or started
    attempts = delivery.attempts + 1
    what = f"webhook {delivery.id} ({delivery.event}) to {delivery.url}"
    try:
        status = deliver(delivery, settings)
    except ValidationFailed as exc:
        log.warning("%s not sent, and never will be: %s", what, exc.message)
        return None
    except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, DNS, TLS, not HTTP
        failure = f"{type(exc).__name__}: {exc}"
    else:
        if 200 <= status < 300:
            log.info("%s delivered (HTTP %d) at attempt %d", what, status, attempts)
            return None
        if status == 410:
            log.warning("%s: the receiver answered 410 Gone; not retried", what)
            return None
        failure = f"HTTP {status}" + (" (a redirect: never followed)" if 300 <= status < 400 else "")
    now = time.time()
    wait = backoff_s(attempts, settings.webhook_backoff_s, rng)
    if now + wait > first + settings.webhook_retry_window_s:
        log.warning("%s: gave up after %d attempts over %.1f s; the last: %s", what, attempts, now - first, failure)
        return None
    log.info("%s: attempt %d failed (%s); next in %.1f s", what, attempts, failure, wait)
    return replace(delivery, attempts=attempts, first_attempt_at=first, due_at=now + wait)
