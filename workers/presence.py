"""The worker's presence in the job store: every few seconds it says which queues it
consumes and with how many task threads (``JobStore.announce``), so a queued job's
estimated start knows the idle capacity waiting for it (``tasks.views.PlaceInLine``). A
worker that stops withdraws; one that dies lapses after ``LAPSE_INTERVALS`` missed turns.
"""

from __future__ import annotations

import logging
import threading

from tasks.errors import DependencyUnavailable
from tasks.store import JobStore

log = logging.getLogger(__name__)

#: Seconds between announcements.
INTERVAL_S = 5.0
#: A worker not heard from for this many intervals is gone.
LAPSE_INTERVALS = 3


class Presence:
    def __init__(self, store: JobStore, worker: str, queues: list[str], threads: int, interval_s: float = INTERVAL_S):
        self._store = store
        self._worker = worker
        self._queues = queues
        self._threads = threads
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="presence", daemon=True)

    def start(self) -> None:
        self._announce()  # before the consumer starts: a job queued now already sees it
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            self._store.withdraw(self._worker, self._queues)
        except DependencyUnavailable as exc:
            log.warning("could not withdraw the worker's presence (it lapses by itself): %s", exc)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._announce()

    def _announce(self) -> None:
        try:
            self._store.announce(self._worker, self._queues, self._threads, self._interval_s * LAPSE_INTERVALS)
        except DependencyUnavailable as exc:
            log.warning("could not announce the worker's presence: %s", exc)
