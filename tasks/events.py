"""Job events: every state change and every denoising step, published on one Redis
channel, and a per-process hub that wakes whoever waits on a job.

The job store publishes a ``state`` event in the same Lua script that changes the state,
so no change can happen without its event; the worker publishes ``progress`` at each step
boundary of a model call. Waiters (``Prefer: wait``, the SSE stream, a worker listening
for cancels) never poll: each process keeps ONE subscription, read by one thread (a
greenlet under gunicorn's gevent worker), and fans the events out to per-job queues.

Pub/sub delivers at most once: while the subscription reconnects (Redis restarted),
events are lost. The hub then sends every waiter a ``resync`` and the waiter re-reads the
job, so a lost event delays nobody longer than the reconnect.
"""

from __future__ import annotations

import enum
import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis

from tasks.errors import DependencyUnavailable
from tasks.jobs import JobState

log = logging.getLogger(__name__)

CHANNEL = "fleet:events"


class EventKind(str, enum.Enum):
    STATE = "state"  # the job moved to ``JobEvent.state``
    PROGRESS = "progress"  # its model call finished ``step`` of ``total``
    RESYNC = "resync"  # events may have been lost (never on the wire): read the job again


@dataclass(frozen=True)
class JobEvent:
    """One event of one job. The wire form (JSON on ``CHANNEL``, written by ``encode`` here
    and by the job store's Lua scripts, which take their names from these enums) is read
    back only by ``decode``."""

    job_id: str
    kind: EventKind
    state: JobState | None = None
    step: int | None = None
    total: int | None = None

    def encode(self) -> str:
        raw: dict[str, Any] = {"job_id": self.job_id, "kind": self.kind.value}
        if self.state is not None:
            raw["state"] = self.state.value
        if self.step is not None and self.total is not None:
            raw |= {"step": self.step, "total": self.total}
        return json.dumps(raw)

    @classmethod
    def decode(cls, data: bytes | str) -> JobEvent | None:
        """The event, or None (logged) for a message that is not one."""
        try:
            raw = json.loads(data)
            kind = EventKind(raw["kind"])
            state = JobState(raw["state"]) if kind is EventKind.STATE else None
            step, total = (int(raw["step"]), int(raw["total"])) if kind is EventKind.PROGRESS else (None, None)
            return cls(str(raw["job_id"]), kind, state, step, total)
        except (ValueError, TypeError, KeyError):
            log.warning("ignoring a malformed job event: %r", data)
            return None


class EventHub:
    """One subscription to ``CHANNEL`` for the whole process, fanned out to waiters.

    ``watch(job_id)`` gives a queue of that job's events; the subscription is live before
    it returns, so a caller that reads the job *after* entering ``watch`` misses nothing.
    """

    def __init__(self, connect: Callable[[], redis.Redis], ready_timeout_s: float = 5.0):
        self._connect = connect
        self._ready_timeout_s = ready_timeout_s
        self._lock = threading.Lock()
        self._waiters: dict[str, set[queue.Queue[JobEvent]]] = {}
        self._all: set[queue.Queue[JobEvent]] = set()
        self._subscribed = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._changes = 0

    @contextmanager
    def watch(self, job_id: str | None = None) -> Iterator[queue.Queue[JobEvent]]:
        """A queue of ``JobEvent`` for ``job_id`` (every job's when None) while inside."""
        events: queue.Queue[JobEvent] = queue.Queue()
        with self._lock:
            (self._waiters.setdefault(job_id, set()) if job_id else self._all).add(events)
            self._start()
        try:
            if not self._subscribed.wait(self._ready_timeout_s):
                raise DependencyUnavailable("job store", "could not subscribe to job events")
            yield events
        finally:
            with self._lock:
                if job_id is None:
                    self._all.discard(events)
                else:
                    waiters = self._waiters.get(job_id, set())
                    waiters.discard(events)
                    if not waiters:
                        self._waiters.pop(job_id, None)

    @property
    def waiting(self) -> int:
        """Queues open now (for tests and metrics)."""
        with self._lock:
            return sum(len(w) for w in self._waiters.values()) + len(self._all)

    @property
    def changes(self) -> int:
        """How many state changes (of any job) and resyncs this process has heard of: a
        waiter that keeps the count it last saw knows, without a queue of every job's
        events, whether anything may have moved since (a queued job's place in line)."""
        return self._changes

    def close(self) -> None:
        self._closed = True

    # -- the listener --------------------------------------------------------------------
    def _start(self) -> None:
        """Under the lock: start the listener once."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._listen, name="job-events", daemon=True)
            self._thread.start()

    def _listen(self) -> None:
        backoff = 0.1
        while not self._closed:
            pubsub = None
            try:
                pubsub = self._connect().pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CHANNEL)
                pubsub.get_message(timeout=self._ready_timeout_s)  # the subscribe confirmation
                if self._subscribed.is_set():
                    self._broadcast_resync()  # reconnected: what was missed is unknown
                self._subscribed.set()
                backoff = 0.1
                while not self._closed:
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        event = JobEvent.decode(message["data"])
                        if event is not None:
                            self._dispatch(event)
            except (redis.RedisError, OSError) as exc:
                log.warning("job events: subscription lost (%s); reconnecting", exc)
                self._subscribed.clear()
                self._broadcast_resync()
                threading.Event().wait(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except (redis.RedisError, OSError):
                        pass

    def _dispatch(self, event: JobEvent) -> None:
        if event.kind != "progress":
            self._changes += 1  # only the listener thread writes it
        with self._lock:
            targets = list(self._waiters.get(event.job_id, ())) + list(self._all)
        for target in targets:
            target.put(event)

    def _broadcast_resync(self) -> None:
        self._changes += 1
        with self._lock:
            targets = [(job_id, q) for job_id, qs in self._waiters.items() for q in qs]
            targets += [("", q) for q in self._all]
        for job_id, target in targets:
            target.put(JobEvent(job_id, EventKind.RESYNC))
