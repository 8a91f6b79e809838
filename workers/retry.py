"""Retrying a call to storage or the job store with exponential backoff, for a bounded time."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from tasks.errors import DependencyUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")


def with_retries(
    call: Callable[[], T],
    window_s: float,
    backoff_s: float,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Call until it succeeds or ``window_s`` has passed; the last error is re-raised.

    Only ``DependencyUnavailable`` is retried: anything else is not the store being down.
    Waits double from ``backoff_s`` up to 10 s.
    """
    deadline = clock() + window_s
    wait = backoff_s
    while True:
        try:
            return call()
        except DependencyUnavailable as exc:
            if clock() + wait > deadline:
                raise
            log.warning("%s failed (%s); retrying in %.1fs", what, exc.message, wait)
            sleep(wait)
            wait = min(wait * 2, 10.0)
