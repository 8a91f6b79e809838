"""Job records in Redis: one hash per job, with a TTL, moved between states atomically,
and the indexes kept with them (outbox, queue places, running jobs, Cancel-After
deadlines, each API key's jobs). Key names are ``tasks.keyspace``'s; what an API key has
beside its jobs (rate windows, idempotency keys) is ``tasks.owners``.

Every state change runs as one Lua script that checks the current state against
``tasks.jobs.TRANSITIONS`` before writing, so two workers (or one message delivered
twice) can never move a job backwards or finish it twice.
"""

from __future__ import annotations

import string
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import redis

from tasks.errors import DependencyUnavailable
from tasks.events import CHANNEL, EventKind
from tasks.jobs import TERMINAL_STATES, TRANSITIONS, Job, JobState, JobUpdate
from tasks.keyspace import (
    CANCEL_AFTER_KEY,
    CONSUMER_THREADS_KEY,
    CONSUMERS_PREFIX,
    FINISHED_PREFIX,
    KEY_PREFIX,
    OUTBOX_KEY,
    OWNER_PREFIX,
    QUEUED_PREFIX,
    RUNNING_PREFIX,
    active_key,
    job_key,
    lock_key,
    owned_key,
    store_errors,
)
from tasks.request import WebhookEvent

THROUGHPUT_WINDOW_S = 120
#: A job of priority p is placed in line as if it had come p x this earlier: ahead of
#: every job of a lower priority.
PRIORITY_SPAN_S = 1e9

_PROGRESS_HOOK: WebhookEvent = "progress"


def lua(template: str) -> str:
    """A Lua script with the names it shares with Python filled in from their one
    definition: ``$QUEUED`` and the other states, ``$TERMINAL`` (a Lua set), the event kinds."""
    names = {state.name: state.value for state in JobState} | {
        "TERMINAL": "{" + ", ".join(f"{s.value} = true" for s in sorted(TERMINAL_STATES)) + "}",
        "STATE_EVENT": EventKind.STATE.value,
        "PROGRESS_EVENT": EventKind.PROGRESS.value,
        "PROGRESS_HOOK": _PROGRESS_HOOK,
        "WINDOW": str(THROUGHPUT_WINDOW_S),
    }
    return string.Template(template).substitute(names)


_TRANSITION_LUA = """
local THROUGHPUT_WINDOW_S = $WINDOW
local TERMINAL = $TERMINAL
local current = redis.call('HGET', KEYS[1], 'state')
if not current then return {0, ''} end
if not string.find(',' .. ARGV[2] .. ',', ',' .. current .. ',', 1, true) then
  return {0, current}
end
if ARGV[1] == '$RUNNING' then redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
redis.call('ZREM', KEYS[2], ARGV[4])  -- delivered or finished: published for sure
if #ARGV > 5 then
  redis.call('HSET', KEYS[1], 'state', ARGV[1], unpack(ARGV, 6))
else
  redis.call('HSET', KEYS[1], 'state', ARGV[1])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
local queue = redis.call('HGET', KEYS[1], 'queue') or ''
if current == '$QUEUED' then redis.call('ZREM', KEYS[3] .. queue, ARGV[4]) end
if ARGV[1] == '$RUNNING' then
  redis.call('ZADD', KEYS[7] .. queue, ARGV[5], ARGV[4])
elseif current == '$RUNNING' then
  redis.call('ZREM', KEYS[7] .. queue, ARGV[4])
end
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and TERMINAL[ARGV[1]] then
  redis.call('ZREM', KEYS[6] .. owner .. ':active', ARGV[4])
end
if ARGV[1] == '$SUCCEEDED' then
  local finished = KEYS[4] .. queue
  redis.call('ZADD', finished, ARGV[5], ARGV[4])
  redis.call('ZREMRANGEBYSCORE', finished, '-inf', ARGV[5] - THROUGHPUT_WINDOW_S)
end
redis.call('PUBLISH', KEYS[5], cjson.encode({job_id = ARGV[4], kind = '$STATE_EVENT', state = ARGV[1]}))
return {1, ARGV[1], redis.call('HGET', KEYS[1], 'webhook') or ''}
"""

#: Add ARGV[2] to field ARGV[1] of each existing record: a counter never creates a record
#: (one without its id, state or TTL) for a job that expired or was never there.
_COUNT_LUA = """
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then redis.call('HINCRBY', key, ARGV[1], ARGV[2]) end
end
"""


#: For each existing job that is RUNNING: record its progress and tell its waiters.
#: Returns the ids of those whose webhook wants progress events.
_PROGRESS_LUA = """
local hooked = {}
for i, key in ipairs(KEYS) do
  if i > 1 and redis.call('HGET', key, 'state') == '$RUNNING' then
    redis.call('HSET', key, 'step', ARGV[1], 'total_steps', ARGV[2])
    local event = {job_id = string.sub(key, #ARGV[3] + 1), kind = '$PROGRESS_EVENT', step = tonumber(ARGV[1]),
                   total = tonumber(ARGV[2])}
    redis.call('PUBLISH', KEYS[1], cjson.encode(event))
    local events = redis.call('HGET', key, 'webhook_events')
    if events and string.find(',' .. events .. ',', ',$PROGRESS_HOOK,', 1, true) then
      table.insert(hooked, event.job_id)
    end
  end
end
return hooked
"""


def _sources(target: JobState, only_from: frozenset[JobState] | None = None) -> str:
    return ",".join(
        s.value for s, targets in TRANSITIONS.items() if target in targets and (only_from is None or s in only_from)
    )


@dataclass(frozen=True)
class QueuePlace:
    """Where a QUEUED job stands in its queue, and what that queue's workers are doing
    (``tasks.views.PlaceInLine.estimate`` weighs it)."""

    position: int  # QUEUED jobs of its queue ahead of it
    jobs_per_s: float  # jobs the queue finished per second over the last THROUGHPUT_WINDOW_S
    running: int  # its jobs RUNNING now (held by workers)
    threads: int  # task threads of the workers consuming it now (``announce``)


@dataclass(frozen=True)
class TransitionResult:
    applied: bool
    state: JobState | None  # the state after the call; None if the job does not exist


class JobStore:
    def __init__(self, client: redis.Redis, ttl_s: int):
        self._redis = client
        self._ttl_s = ttl_s
        self._transition = client.register_script(lua(_TRANSITION_LUA))
        self._count = client.register_script(_COUNT_LUA)
        self._progress = client.register_script(lua(_PROGRESS_LUA))
        self._on_change: list[Callable[[str, JobState], None]] = []

    def on_change(self, callback: Callable[[str, JobState], None]) -> None:
        """Call ``callback(job_id, state)`` after each state change this store applies to a
        job with a webhook (``tasks.notify``), after the callbacks added before it."""
        self._on_change.append(callback)

    @staticmethod
    def key(job_id: str) -> str:
        return job_key(job_id)

    def ping(self) -> None:
        try:
            self._redis.ping()
        except redis.RedisError as exc:
            raise DependencyUnavailable("job store", str(exc)) from exc

    def create(self, job: Job, publish_by: float) -> None:
        """Record a new job and its outbox entry, atomically: if its message is not sent
        by ``publish_by`` (the API died first), a sweeper sends it."""
        with store_errors():
            with self._redis.pipeline(transaction=True) as pipe:
                fields: Mapping[Any, Any] = job.to_redis()  # redis-py's key type is a union: dict is invariant
                pipe.hset(self.key(job.id), mapping=fields)
                pipe.expire(self.key(job.id), self._ttl_s)
                pipe.zadd(OUTBOX_KEY, {job.id: publish_by})
                pipe.zadd(QUEUED_PREFIX + job.queue, {job.id: job.created_at - job.priority * PRIORITY_SPAN_S})
                if job.cancel_at is not None:
                    pipe.zadd(CANCEL_AFTER_KEY, {job.id: job.cancel_at})
                if job.owner:
                    for index in (owned_key(job.owner), active_key(job.owner)):
                        pipe.zadd(index, {job.id: job.created_at})
                        pipe.zremrangebyscore(index, "-inf", job.created_at - self._ttl_s)  # expired
                pipe.execute()

    def published(self, job_id: str, republish_at: float) -> None:
        """The job's message is with the broker; if no worker has taken it by
        ``republish_at``, the message may be lost and is sent again."""
        with store_errors():
            self._redis.zadd(OUTBOX_KEY, {job_id: republish_at}, xx=True)

    def forget_outbox(self, job_id: str) -> None:
        with store_errors():
            self._redis.zrem(OUTBOX_KEY, job_id)

    def due_for_publishing(self, now: float, limit: int = 100) -> list[str]:
        """Outbox entries whose time has come."""
        with store_errors():
            ids = self._redis.zrangebyscore(OUTBOX_KEY, "-inf", now, start=0, num=limit)
        return [_text(i) for i in ids]

    def try_lock(self, name: str, ttl_s: int) -> bool:
        """A lock that expires by itself: True if this caller holds it now."""
        with store_errors():
            return bool(self._redis.set(lock_key(name), "1", nx=True, ex=max(1, ttl_s)))

    def enter_model(self, job_ids: list[str]) -> None:
        """Before a model call: count a crash for each job, taken back by ``leave_model``
        when the call returns. What stays counted are calls a worker died in."""
        self._count_crashes(job_ids, 1)

    def leave_model(self, job_ids: list[str]) -> None:
        self._count_crashes(job_ids, -1)

    def _count_crashes(self, job_ids: list[str], delta: int) -> None:
        if job_ids:
            with store_errors():
                self._count(keys=[self.key(i) for i in job_ids], args=["crashes", delta])

    def release(self, job_id: str) -> None:
        """Undo a claim for a job handed back unstarted (worker shutdown): the next
        delivery is not counted as a retry. The state stays RUNNING: it never goes back."""
        with store_errors():
            self._count(keys=[self.key(job_id)], args=["attempts", -1])
            self._redis.hdel(self.key(job_id), "worker")

    def get(self, job_id: str) -> Job | None:
        with store_errors():
            raw = self._redis.hgetall(self.key(job_id))
        if not raw:
            return None
        return Job.from_redis({_text(k): _text(v) for k, v in raw.items()})

    def states(self, job_ids: list[str]) -> dict[str, JobState | None]:
        """The state of many jobs in one round trip (None: no record)."""
        with store_errors(), self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(self.key(job_id), "state")
            raw = pipe.execute()
        return {i: JobState(_text(s)) if s else None for i, s in zip(job_ids, raw, strict=True)}

    def delete(self, job: Job) -> None:
        with store_errors(), self._redis.pipeline(transaction=True) as pipe:
            job_id = job.id
            pipe.delete(self.key(job_id))
            pipe.zrem(QUEUED_PREFIX + job.queue, job_id)
            pipe.zrem(OUTBOX_KEY, job_id)
            pipe.zrem(CANCEL_AFTER_KEY, job_id)
            if job.owner:
                pipe.zrem(owned_key(job.owner), job_id)
                pipe.zrem(active_key(job.owner), job_id)
            pipe.execute()

    def transition(
        self,
        job_id: str,
        target: JobState,
        update: JobUpdate | None = None,
        only_from: frozenset[JobState] | None = None,
    ) -> TransitionResult:
        """Move a job to ``target`` if its current state allows it (and is one of
        ``only_from``, when given), writing ``update`` too. Publishes a ``state`` event."""
        args: list[str] = [target.value, _sources(target, only_from), str(self._ttl_s), job_id, repr(time.time())]
        for name, value in (update or JobUpdate()).to_redis().items():
            args += [name, value]
        keys = [self.key(job_id), OUTBOX_KEY, QUEUED_PREFIX, FINISHED_PREFIX, CHANNEL, OWNER_PREFIX, RUNNING_PREFIX]
        with store_errors():
            applied, state, *hooked = self._transition(keys=keys, args=args)
        state = _text(state)
        result = TransitionResult(bool(applied), JobState(state) if state else None)
        if result.applied and hooked and hooked[0]:
            for callback in self._on_change:
                callback(job_id, target)
        return result

    def progress(self, job_ids: list[str], step: int, total: int) -> list[str]:
        """The model call these jobs are in finished ``step`` of ``total``. Returns those
        whose webhook wants to hear it."""
        if not job_ids:
            return []
        with store_errors():
            hooked = self._progress(keys=[CHANNEL] + [self.key(i) for i in job_ids], args=[step, total, KEY_PREFIX])
        return [_text(i) for i in hooked]

    def place_in_line(self, job: Job) -> QueuePlace | None:
        """A QUEUED job's place in its queue; None when it is not QUEUED there."""
        now_s = time.time()
        with store_errors(), self._redis.pipeline(transaction=False) as pipe:
            pipe.zrank(QUEUED_PREFIX + job.queue, job.id)
            pipe.zcount(FINISHED_PREFIX + job.queue, now_s - THROUGHPUT_WINDOW_S, "+inf")
            pipe.zcard(RUNNING_PREFIX + job.queue)
            pipe.zrangebyscore(CONSUMERS_PREFIX + job.queue, now_s, "+inf")
            position, finished, running, consumers = pipe.execute()
        if position is None:
            return None
        threads = 0
        if consumers:
            with store_errors():
                threads = sum(int(t) for t in self._redis.hmget(CONSUMER_THREADS_KEY, consumers) if t)
        return QueuePlace(int(position), finished / THROUGHPUT_WINDOW_S, int(running), threads)

    def live_workers(self, queues: list[str]) -> dict[str, set[str]]:
        """Per queue, the workers consuming it now (announced and not lapsed)."""
        now_s = time.time()
        with store_errors(), self._redis.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.zrangebyscore(CONSUMERS_PREFIX + queue, now_s, "+inf")
            found = pipe.execute()
        return {queue: {_text(w) for w in workers} for queue, workers in zip(queues, found, strict=True)}

    def announce(self, worker: str, queues: list[str], threads: int, ttl_s: float) -> None:
        """``worker`` consumes ``queues`` with ``threads`` task threads, for ``ttl_s`` more
        seconds unless announced again (a worker does every few seconds: one that died
        lapses by itself)."""
        expires = time.time() + ttl_s
        with store_errors(), self._redis.pipeline(transaction=True) as pipe:
            for queue in queues:
                pipe.zadd(CONSUMERS_PREFIX + queue, {worker: expires})
                pipe.zremrangebyscore(CONSUMERS_PREFIX + queue, "-inf", time.time())  # lapsed
            pipe.hset(CONSUMER_THREADS_KEY, worker, str(threads))
            pipe.execute()

    def withdraw(self, worker: str, queues: list[str]) -> None:
        """``worker`` stopped consuming ``queues``."""
        with store_errors(), self._redis.pipeline(transaction=True) as pipe:
            for queue in queues:
                pipe.zrem(CONSUMERS_PREFIX + queue, worker)
            pipe.hdel(CONSUMER_THREADS_KEY, worker)
            pipe.execute()

    def list_jobs(
        self, owner: str, state: JobState | None = None, limit: int = 50, before: float | None = None
    ) -> list[Job]:
        """``owner``'s jobs, newest first, created before ``before`` (a cursor), in
        ``state`` when given. Scans at most 20 pages of ``limit`` for a state filter."""
        found: list[Job] = []
        upper = "+inf" if before is None else f"({before!r}"
        for _ in range(20):
            with store_errors():
                page = cast(
                    "list[tuple[bytes, float]]",
                    self._redis.zrevrangebyscore(owned_key(owner), upper, "-inf", start=0, num=limit, withscores=True),
                )
            if not page:
                break
            for job_id, _ in page:
                job = self.get(_text(job_id))
                if job is not None and (state is None or job.state is state):
                    found.append(job)
                    if len(found) == limit:
                        return found
            upper = f"({page[-1][1]!r}"
        return found

    def backlog(self, queues: list[str]) -> dict[str, tuple[int, int]]:
        """Per queue, (queued, running): what workers still have to do. Unlike the broker's
        queue length it counts the jobs workers have already prefetched and are running,
        so a scaler that reads it never takes away a worker that still has work."""
        expired = time.time() - self._ttl_s  # entries whose record expired unfinished
        with store_errors(), self._redis.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.zremrangebyscore(RUNNING_PREFIX + queue, "-inf", expired)
                pipe.zcard(QUEUED_PREFIX + queue)
                pipe.zcard(RUNNING_PREFIX + queue)
            counts = pipe.execute()
        return {queue: (int(counts[3 * i + 1]), int(counts[3 * i + 2])) for i, queue in enumerate(queues)}

    def due_for_canceling(self, now: float, limit: int = 100) -> list[str]:
        """Jobs whose ``Cancel-After`` deadline has passed (whatever their state)."""
        with store_errors():
            ids = self._redis.zrangebyscore(CANCEL_AFTER_KEY, "-inf", now, start=0, num=limit)
        return [_text(i) for i in ids]

    def forget_cancel_after(self, job_id: str) -> None:
        with store_errors():
            self._redis.zrem(CANCEL_AFTER_KEY, job_id)

    def ttl(self, job_id: str) -> int:
        with store_errors():
            return int(self._redis.ttl(self.key(job_id)))


def _text(value: object) -> str:
    """A value read from Redis (bytes: the client does not decode) as text."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, str):
        return value
    raise TypeError(f"expected bytes or str from Redis, got {type(value).__name__}")


def now() -> float:
    return time.time()
