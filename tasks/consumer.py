"""The Celery consumer every fleet worker runs (``worker_consumer``): Celery's own, except
that after losing the broker it tries again at least every ``RECONNECT_MAX_S`` seconds.

Celery backs off 2, 4, 6 ... up to 30 s between attempts, so a worker whose link was cut
for a minute sat idle up to half a minute after the heal (measured in tests/partitions). An
attempt while the broker is unreachable costs one connect, bounded by
``FLEET_PUBLISH_TIMEOUT_S``.
"""

from __future__ import annotations

import functools
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

RECONNECT_MAX_S = 5


class Consumer(CeleryConsumer):
    def ensure_connected(self, conn: Any) -> Any:
        # Celery calls ``conn.ensure_connection`` with kombu's default intervals; this
        # connection object is the consumer's own, made for this one call.
        conn.ensure_connection = functools.partial(
            conn.ensure_connection, interval_start=1, interval_step=1, interval_max=RECONNECT_MAX_S
        )
        return super().ensure_connected(conn)
