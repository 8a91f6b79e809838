"""The worker's ear for cancels: a job canceled through the API (its state moved to
CANCELED in the job store, which publishes the change) is dropped from this worker's
runner at once, so a queued job never runs and a running one stops at its next step.

A missed event costs only compute: the job still ends CANCELED with nothing stored
(``workers.jobs`` checks the state before and after storing its images).
"""

from __future__ import annotations

import logging
import queue
import threading

from tasks.cancel import CANCELED_BY_CLIENT
from tasks.events import EventHub, EventKind
from tasks.jobs import JobState
from workers.runner import ModelRunner

log = logging.getLogger(__name__)


class CancelListener:
    def __init__(self, hub: EventHub, runner: ModelRunner):
        self._hub = hub
        self._runner = runner
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cancel-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._hub.close()
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self._hub.watch() as events:
                    while not self._stop.is_set():
                        try:
                            event = events.get(timeout=1.0)
                        except queue.Empty:
                            continue
                        if event.kind is EventKind.STATE and event.state is JobState.CANCELED:
                            if self._runner.cancel(event.job_id, CANCELED_BY_CLIENT):
                                log.info("job %s canceled by its client: dropped", event.job_id)
            except Exception:
                log.exception("the cancel listener failed; restarting it")
                self._stop.wait(1.0)
