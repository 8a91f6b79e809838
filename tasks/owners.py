"""What the fleet keeps per API key, beside its jobs: the submissions of the current rate
window, the idempotency keys it used, and how many of its jobs are not finished. The job
store (``tasks.store``) keeps the key's job indexes up to date as jobs are created and end;
this ledger reads them."""

from __future__ import annotations

import time

import redis

from tasks.keyspace import active_key, idempotency_key, rate_key, store_errors


class Owners:
    def __init__(self, client: redis.Redis):
        self._redis = client

    def count_request(self, owner: str, window_s: int = 60) -> tuple[int, float]:
        """Count one request of ``owner`` in the current fixed window: the count so far and
        the seconds until the window ends."""
        now_s = time.time()
        window = int(now_s // window_s)
        key = rate_key(owner, window)
        with store_errors(), self._redis.pipeline(transaction=True) as pipe:
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
        name = idempotency_key(owner, key)
        with store_errors():
            if self._redis.set(name, f"{fingerprint}:{job_id}", nx=True, ex=ttl_s):
                return None
            earlier = self._redis.get(name)
        if earlier is None:  # expired in between: claim it afresh
            return self.claim_idempotency_key(owner, key, fingerprint, job_id, ttl_s)
        fingerprint_then, _, job_then = _text(earlier).partition(":")
        return fingerprint_then, job_then

    def forget_idempotency_key(self, owner: str, key: str) -> None:
        with store_errors():
            self._redis.delete(idempotency_key(owner, key))

    def active_jobs(self, owner: str) -> int:
        """Jobs of ``owner`` not finished yet."""
        with store_errors():
            return int(self._redis.zcard(active_key(owner)))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
