"""Where the fleet keeps things in Redis: every key name, in one place, and the one way a
Redis error becomes ``DependencyUnavailable``. The job store (``tasks.store``), the API-key
ledger (``tasks.owners``) and their Lua scripts all name keys from here."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from tasks.errors import DependencyUnavailable

#: One hash per job: ``fleet:job:<id>``.
KEY_PREFIX = "fleet:job:"
#: Jobs not yet taken by a worker: id -> when to publish their message (again) if still
#: QUEUED then. A worker's claim removes the entry. See ``workers.sweeper``.
OUTBOX_KEY = "fleet:outbox"
#: Per queue (the name follows): QUEUED jobs by position, for a job's place in line.
QUEUED_PREFIX = "fleet:queued:"
#: Per queue: RUNNING jobs (taken by a worker, in its batcher or its model call), by when
#: they were taken. With ``QUEUED_PREFIX``: the queue's true backlog.
RUNNING_PREFIX = "fleet:running:"
#: Per queue: jobs that SUCCEEDED lately, by finish time: the measured throughput a queued
#: job's estimated start is predicted from.
FINISHED_PREFIX = "fleet:finished:"
#: Per queue: the workers consuming it, by when their presence lapses unless renewed.
CONSUMERS_PREFIX = "fleet:consumers:"
#: Worker name -> its task threads: how many jobs it holds at once.
CONSUMER_THREADS_KEY = "fleet:consumer-threads"
#: Jobs with a ``Cancel-After`` deadline, by that deadline: the sweeper cancels those
#: still QUEUED when it passes.
CANCEL_AFTER_KEY = "fleet:cancel-after"
#: Per API key name: ``<name>:jobs`` (every job, by creation: the listing), ``<name>:active``
#: (those not finished: the cap on active jobs), rate windows and idempotency keys.
OWNER_PREFIX = "fleet:owner:"


def job_key(job_id: str) -> str:
    return KEY_PREFIX + job_id


def owned_key(owner: str) -> str:
    return f"{OWNER_PREFIX}{owner}:jobs"


def active_key(owner: str) -> str:
    return f"{OWNER_PREFIX}{owner}:active"


def rate_key(owner: str, window: int) -> str:
    return f"{OWNER_PREFIX}{owner}:rate:{window}"


def idempotency_key(owner: str, key: str) -> str:
    """The client's key is hashed: any header value makes a bounded, safe key name."""
    return f"{OWNER_PREFIX}{owner}:idempotency:{hashlib.sha256(key.encode()).hexdigest()}"


def lock_key(name: str) -> str:
    return f"fleet:lock:{name}"


@contextmanager
def store_errors() -> Iterator[None]:
    """A Redis error inside is the job store being unavailable."""
    try:
        yield
    except redis.RedisError as exc:
        raise DependencyUnavailable("job store", str(exc)) from exc
