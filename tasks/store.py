"""Job records in Redis: one hash per job, with a TTL, moved between states atomically.

Every state change runs as one Lua script that checks the current state against
``tasks.jobs.TRANSITIONS`` before writing, so two workers (or one message delivered
twice) can never move a job backwards or finish it twice.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import redis

from tasks.errors import DependencyUnavailable
from tasks.events import CHANNEL
from tasks.jobs import TRANSITIONS, Job, JobState, JobUpdate

KEY_PREFIX = "fleet:job:"
#: Jobs not yet taken by a worker: id -> when to publish their message (again) if still
#: QUEUED then. A worker's claim removes the entry. See ``workers.sweeper``.
OUTBOX_KEY = "fleet:outbox"
#: Per queue (the name follows): QUEUED jobs by position, for a job's place in line.
QUEUED_PREFIX = "fleet:queued:"
#: Per queue: RUNNING jobs (taken by a worker, in its batcher or its model call), by when
#: they were taken. With ``QUEUED_PREFIX``: the queue's true backlog (``backlog``).
RUNNING_PREFIX = "fleet:running:"
#: Per queue: jobs that SUCCEEDED in the last ``THROUGHPUT_WINDOW_S``, by finish time: the
#: measured throughput a queued job's estimated start is predicted from.
FINISHED_PREFIX = "fleet:finished:"
THROUGHPUT_WINDOW_S = 120
#: A job of priority p is placed in line as if it had come p x this earlier: ahead of
#: every job of a lower priority.
PRIORITY_SPAN_S = 1e9
#: Per API key name: ``<name>:jobs`` (every job, by creation: the listing) and
#: ``<name>:active`` (those not finished: the cap on active jobs).
OWNER_PREFIX = "fleet:owner:"

_TRANSITION_LUA = """
local THROUGHPUT_WINDOW_S = $WINDOW
local current = redis.call('HGET', KEYS[1], 'state')
if not current then return {0, ''} end
if not string.find(',' .. ARGV[2] .. ',', ',' .. current .. ',', 1, true) then
  return {0, current}
end
if ARGV[1] == 'RUNNING' then redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
redis.call('ZREM', KEYS[2], ARGV[4])  -- delivered or finished: published for sure
if #ARGV > 5 then
  redis.call('HSET', KEYS[1], 'state', ARGV[1], unpack(ARGV, 6))
else
  redis.call('HSET', KEYS[1], 'state', ARGV[1])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
local queue = redis.call('HGET', KEYS[1], 'queue') or ''
if current == 'QUEUED' then redis.call('ZREM', KEYS[3] .. queue, ARGV[4]) end
if ARGV[1] == 'RUNNING' then
  redis.call('ZADD', KEYS[7] .. queue, ARGV[5], ARGV[4])
elseif current == 'RUNNING' then
  redis.call('ZREM', KEYS[7] .. queue, ARGV[4])
end
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and (ARGV[1] == 'SUCCEEDED' or ARGV[1] == 'FAILED' or ARGV[1] == 'CANCELED') then
  redis.call('ZREM', KEYS[6] .. owner .. ':active', ARGV[4])
end
if ARGV[1] == 'SUCCEEDED' then
  local finished = KEYS[4] .. queue
  redis.call('ZADD', finished, ARGV[5], ARGV[4])
  redis.call('ZREMRANGEBYSCORE', finished, '-inf', ARGV[5] - THROUGHPUT_WINDOW_S)
end
redis.call('PUBLISH', KEYS[5], cjson.encode({job_id = ARGV[4], kind = 'state', state = ARGV[1]}))
return {1, ARGV[1], redis.call('HGET', KEYS[1], 'webhook') or ''}
""".replace("$WINDOW", str(THROUGHPUT_WINDOW_S))

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
  if i > 1 and redis.call('HGET', key, 'state') == 'RUNNING' then
    redis.call('HSET', key, 'step', ARGV[1], 'total_steps', ARGV[2])
    local event = {job_id = string.sub(key, #ARGV[3] + 1), kind = 'progress', step = tonumber(ARGV[1]),
                   total = tonumber(ARGV[2])}
    redis.call('PUBLISH', KEYS[1], cjson.encode(event))
    local events = redis.call('HGET', key, 'webhook_events')
    if events and string.find(',' .. events .. ',', ',progress,', 1, true) then table.insert(hooked, event.job_id) end
  end
end
return hooked
"""
#: Jobs with a ``Cancel-After`` deadline, by that deadline: the sweeper cancels those
#: still QUEUED when it passes.
CANCEL_AFTER_KEY = "fleet:cancel-after"


def _sources(target: JobState, only_from: frozenset[JobState] | None = None) -> str:
    return ",".join(
        s.value for s, targets in TRANSITIONS.items() if target in targets and (only_from is None or s in only_from)
    )


@dataclass(frozen=True)
class TransitionResult:
    applied: bool
    state: JobState | None  # the state after the call; None if the job does not exist


class JobStore:
    def __init__(self, client: redis.Redis, ttl_s: int):
        self._redis = client
        self._ttl_s = ttl_s
        self._transition = client.register_script(_TRANSITION_LUA)
        self._count = client.register_script(_COUNT_LUA)
        self._progress = client.register_script(_PROGRESS_LUA)
        self._on_change: Callable[[str, JobState], None] | None = None

    def on_change(self, callback: Callable[[str, JobState], None]) -> None:
        """Call ``callback(job_id, state)`` after each state change this store applies to a
        job with a webhook (``tasks.notify``)."""
        self._on_change = callback

    @staticmethod
    def key(job_id: str) -> str:
        return KEY_PREFIX + job_id

    def ping(self) -> None:
        try:
            self._redis.ping()
        except redis.RedisError as exc:
            raise DependencyUnavailable("job store", str(exc)) from exc

    def create(self, job: Job, publish_by: float) -> None:
        """Record a new job and its outbox entry, atomically: if its message is not sent
        by ``publish_by`` (the API died first), a sweeper sends it."""
        with self._errors():
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(self.key(job.id), mapping=job.to_redis())
                pipe.expire(self.key(job.id), self._ttl_s)
                pipe.zadd(OUTBOX_KEY, {job.id: publish_by})
                pipe.zadd(QUEUED_PREFIX + job.queue, {job.id: job.created_at - job.priority * PRIORITY_SPAN_S})
                if job.cancel_at is not None:
                    pipe.zadd(CANCEL_AFTER_KEY, {job.id: job.cancel_at})
                if job.owner:
                    for index in (self._owned(job.owner), self._active(job.owner)):
                        pipe.zadd(index, {job.id: job.created_at})
                        pipe.zremrangebyscore(index, "-inf", job.created_at - self._ttl_s)  # expired
                pipe.execute()

    def published(self, job_id: str, republish_at: float) -> None:
        """The job's message is with the broker; if no worker has taken it by
        ``republish_at``, the message may be lost and is sent again."""
        with self._errors():
            self._redis.zadd(OUTBOX_KEY, {job_id: republish_at}, xx=True)

    def forget_outbox(self, job_id: str) -> None:
        with self._errors():
            self._redis.zrem(OUTBOX_KEY, job_id)

    def due_for_publishing(self, now: float, limit: int = 100) -> list[str]:
        """Outbox entries whose time has come."""
        with self._errors():
            ids = self._redis.zrangebyscore(OUTBOX_KEY, "-inf", now, start=0, num=limit)
        return [i.decode() for i in ids]

    def try_lock(self, name: str, ttl_s: int) -> bool:
        """A lock that expires by itself: True if this caller holds it now."""
        with self._errors():
            return bool(self._redis.set(f"fleet:lock:{name}", "1", nx=True, ex=max(1, ttl_s)))

    def enter_model(self, job_ids: list[str]) -> None:
        """Before a model call: count a crash for each job, taken back by ``leave_model``
        when the call returns. What stays counted are calls a worker died in."""
        self._count_crashes(job_ids, 1)

    def leave_model(self, job_ids: list[str]) -> None:
        self._count_crashes(job_ids, -1)

    def _count_crashes(self, job_ids: list[str], delta: int) -> None:
        if job_ids:
            with self._errors():
                self._count(keys=[self.key(i) for i in job_ids], args=["crashes", delta])

    def release(self, job_id: str) -> None:
        """Undo a claim for a job handed back unstarted (worker shutdown): the next
        delivery is not counted as a retry. The state stays RUNNING: it never goes back."""
        with self._errors():
            self._count(keys=[self.key(job_id)], args=["attempts", -1])
            self._redis.hdel(self.key(job_id), "worker")

    @contextmanager
    def _errors(self):
        try:
            yield
        except redis.RedisError as exc:
            raise DependencyUnavailable("job store", str(exc)) from exc

    def get(self, job_id: str) -> Job | None:
        with self._errors():
            raw = self._redis.hgetall(self.key(job_id))
        if not raw:
            return None
        return Job.from_redis({k.decode(): v.decode() for k, v in raw.items()})

    def states(self, job_ids: list[str]) -> dict[str, JobState | None]:
        """The state of many jobs in one round trip (None: no record)."""
        with self._errors(), self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(self.key(job_id), "state")
            raw = pipe.execute()
        return {i: JobState(s.decode()) if s else None for i, s in zip(job_ids, raw, strict=True)}

    def delete(self, job: Job) -> None:
        with self._errors(), self._redis.pipeline(transaction=True) as pipe:
            job_id = job.id
            pipe.delete(self.key(job_id))
            pipe.zrem(QUEUED_PREFIX + job.queue, job_id)
            pipe.zrem(OUTBOX_KEY, job_id)
            pipe.zrem(CANCEL_AFTER_KEY, job_id)
            if job.owner:
                pipe.zrem(self._owned(job.owner), job_id)
                pipe.zrem(self._active(job.owner), job_id)
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
        with self._errors():
            applied, state, *hooked = self._transition(keys=keys, args=args)
        state = state.decode() if isinstance(state, bytes) else state
        result = TransitionResult(bool(applied), JobState(state) if state else None)
        if result.applied and hooked and hooked[0] and self._on_change is not None:
            self._on_change(job_id, target)
        return result

    def progress(self, job_ids: list[str], step: int, total: int) -> list[str]:
        """The model call these jobs are in finished ``step`` of ``total``. Returns those
        whose webhook wants to hear it."""
        if not job_ids:
            return []
        with self._errors():
            hooked = self._progress(keys=[CHANNEL] + [self.key(i) for i in job_ids], args=[step, total, KEY_PREFIX])
        return [i.decode() if isinstance(i, bytes) else i for i in hooked]

    def place_in_line(self, job: Job) -> tuple[int | None, float, int]:
        """A QUEUED job's position among the QUEUED jobs of its queue (0: next), the jobs
        per second that queue finished over the last ``THROUGHPUT_WINDOW_S``, and how many
        of its jobs are RUNNING now (``tasks.views.PlaceInLine.estimate`` weighs them)."""
        now_s = time.time()
        with self._errors(), self._redis.pipeline(transaction=False) as pipe:
            pipe.zrank(QUEUED_PREFIX + job.queue, job.id)
            pipe.zcount(FINISHED_PREFIX + job.queue, now_s - THROUGHPUT_WINDOW_S, "+inf")
            pipe.zcard(RUNNING_PREFIX + job.queue)
            position, finished, running = pipe.execute()
        return position, finished / THROUGHPUT_WINDOW_S, int(running)

    @staticmethod
    def _owned(owner: str) -> str:
        return f"{OWNER_PREFIX}{owner}:jobs"

    @staticmethod
    def _active(owner: str) -> str:
        return f"{OWNER_PREFIX}{owner}:active"

    def count_request(self, owner: str, window_s: int = 60) -> tuple[int, float]:
        """Count one request of ``owner`` in the current fixed window: the count so far and
        the seconds until the window ends."""
        now_s = time.time()
        window = int(now_s // window_s)
        key = f"{OWNER_PREFIX}{owner}:rate:{window}"
        with self._errors(), self._redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, window_s + 1)
            count, _ = pipe.execute()
        return int(count), (window + 1) * window_s - now_s

    def claim_idempotency_key(
        self, owner: str, key: str, fingerprint: str, job_id: str, ttl_s: int
    ) -> tuple[str, str] | None:
        """Remember that ``owner``'s ``key`` made ``job_id`` from a request with this
        ``fingerprint``: None when the key is new, else the (fingerprint, job id) it was
        first used with (within ``ttl_s``)."""
        name = self._idempotency(owner, key)
        with self._errors():
            if self._redis.set(name, f"{fingerprint}:{job_id}", nx=True, ex=ttl_s):
                return None
            earlier = self._redis.get(name)
        if earlier is None:  # expired in between: claim it afresh
            return self.claim_idempotency_key(owner, key, fingerprint, job_id, ttl_s)
        fingerprint_then, _, job_then = earlier.decode().partition(":")
        return fingerprint_then, job_then

    def forget_idempotency_key(self, owner: str, key: str) -> None:
        with self._errors():
            self._redis.delete(self._idempotency(owner, key))

    @staticmethod
    def _idempotency(owner: str, key: str) -> str:
        return f"{OWNER_PREFIX}{owner}:idempotency:{hashlib.sha256(key.encode()).hexdigest()}"

    def active_jobs(self, owner: str) -> int:
        """Jobs of ``owner`` not finished yet."""
        with self._errors():
            return int(self._redis.zcard(self._active(owner)))

    def list_jobs(
        self, owner: str, state: JobState | None = None, limit: int = 50, before: float | None = None
    ) -> list[Job]:
        """``owner``'s jobs, newest first, created before ``before`` (a cursor), in
        ``state`` when given. Scans at most 20 pages of ``limit`` for a state filter."""
        found: list[Job] = []
        upper = "+inf" if before is None else f"({before!r}"
        for _ in range(20):
            with self._errors():
                page = self._redis.zrevrangebyscore(
                    self._owned(owner), upper, "-inf", start=0, num=limit, withscores=True
                )
            if not page:
                break
            for job_id, _ in page:
                job = self.get(job_id.decode())
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
        with self._errors(), self._redis.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.zremrangebyscore(RUNNING_PREFIX + queue, "-inf", expired)
                pipe.zcard(QUEUED_PREFIX + queue)
                pipe.zcard(RUNNING_PREFIX + queue)
            counts = pipe.execute()
        return {queue: (int(counts[3 * i + 1]), int(counts[3 * i + 2])) for i, queue in enumerate(queues)}

    def due_for_canceling(self, now: float, limit: int = 100) -> list[str]:
        """Jobs whose ``Cancel-After`` deadline has passed (whatever their state)."""
        with self._errors():
            ids = self._redis.zrangebyscore(CANCEL_AFTER_KEY, "-inf", now, start=0, num=limit)
        return [i.decode() for i in ids]

    def forget_cancel_after(self, job_id: str) -> None:
        with self._errors():
            self._redis.zrem(CANCEL_AFTER_KEY, job_id)

    def ttl(self, job_id: str) -> int:
        with self._errors():
            return int(self._redis.ttl(self.key(job_id)))


def now() -> float:
    return time.time()
