"""Job records in Redis: one hash per job, with a TTL, moved between states atomically.

Every state change runs as one Lua script that checks the current state against
``tasks.jobs.TRANSITIONS`` before writing, so two workers (or one message delivered
twice) can never move a job backwards or finish it twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from tasks.errors import DependencyUnavailable
from tasks.jobs import TRANSITIONS, Job, JobState

KEY_PREFIX = "fleet:job:"

_TRANSITION_LUA = """
local current = redis.call('HGET', KEYS[1], 'state')
if not current then return {0, ''} end
if not string.find(',' .. ARGV[2] .. ',', ',' .. current .. ',', 1, true) then
  return {0, current}
end
if ARGV[1] == 'RUNNING' then redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
if #ARGV > 3 then
  redis.call('HSET', KEYS[1], 'state', ARGV[1], unpack(ARGV, 4))
else
  redis.call('HSET', KEYS[1], 'state', ARGV[1])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {1, ARGV[1]}
"""


def _sources(target: JobState) -> str:
    return ",".join(s.value for s, targets in TRANSITIONS.items() if target in targets)


@dataclass(frozen=True)
class TransitionResult:
    applied: bool
    state: JobState | None  # the state after the call; None if the job does not exist


class JobStore:
    def __init__(self, client: redis.Redis, ttl_s: int):
        self._redis = client
        self._ttl_s = ttl_s
        self._transition = client.register_script(_TRANSITION_LUA)

    @staticmethod
    def key(job_id: str) -> str:
        return KEY_PREFIX + job_id

    def ping(self) -> None:
        try:
            self._redis.ping()
        except redis.RedisError as exc:
            raise DependencyUnavailable("job store", str(exc)) from exc

    def create(self, job: Job) -> None:
        try:
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(self.key(job.id), mapping=job.to_redis())
                pipe.expire(self.key(job.id), self._ttl_s)
                pipe.execute()
        except redis.RedisError as exc:
            raise DependencyUnavailable("job store", str(exc)) from exc

    def get(self, job_id: str) -> Job | None:
        try:
            raw = self._redis.hgetall(self.key(job_id))
        except redis.RedisError as exc:
            raise DependencyUnavailable("job store", str(exc)) from exc
        if not raw:
            return None
        return Job.from_redis({k.decode(): v.decode() for k, v in raw.items()})

    def states(self, job_ids: list[str]) -> dict[str, JobState | None]:
        """The state of many jobs in one round trip (None: no record)."""
        with self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(self.key(job_id), "state")
            raw = pipe.execute()
        return {i: JobState(s.decode()) if s else None for i, s in zip(job_ids, raw, strict=True)}

    def delete(self, job_id: str) -> None:
        self._redis.delete(self.key(job_id))

    def transition(self, job_id: str, target: JobState, **fields: str) -> TransitionResult:
        """Move a job to ``target`` if its current state allows it, writing ``fields`` too."""
        args: list[str] = [target.value, _sources(target), str(self._ttl_s)]
        for name, value in fields.items():
            args += [name, value]
        applied, state = self._transition(keys=[self.key(job_id)], args=args)
        state = state.decode() if isinstance(state, bytes) else state
        return TransitionResult(bool(applied), JobState(state) if state else None)

    def ttl(self, job_id: str) -> int:
        return int(self._redis.ttl(self.key(job_id)))


def now() -> float:
    return time.time()
