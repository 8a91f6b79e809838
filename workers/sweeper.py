"""The outbox sweeper: publishes jobs that were recorded but whose message never left.

The API records a job and its outbox entry in one Redis transaction, publishes, then
clears the entry. If it dies in between, the job would stay QUEUED with no message
behind it; every worker runs this sweeper, which publishes such jobs once they are
``outbox_grace_s`` old (a duplicate message is harmless: the job store refuses to finish a
job twice). A Redis lock lets one worker sweep at a time.
"""

from __future__ import annotations

import logging
import threading
import time

from celery import Celery

from tasks.celery import publish_job
from tasks.errors import DependencyUnavailable
from tasks.jobs import JobState
from tasks.settings import Settings
from tasks.store import JobStore

log = logging.getLogger(__name__)


def sweep_once(store: JobStore, celery_app: Celery, settings: Settings, now: float | None = None) -> int:
    """Publish every job stuck in the outbox; returns how many were published."""
    now = time.time() if now is None else now
    published = 0
    for job_id in store.unpublished(created_before=now - settings.outbox_grace_s):
        job = store.get(job_id)
        if job is None or job.state is not JobState.QUEUED:
            store.published(job_id)  # expired, or already delivered
            continue
        publish_job(celery_app, job_id, job.queue or settings.queue, settings.publish_timeout_s)
        store.published(job_id)
        log.warning("published job %s that the API recorded but never sent", job_id)
        published += 1
    return published


class Sweeper:
    def __init__(self, store: JobStore, celery_app: Celery, settings: Settings):
        self._store = store
        self._celery = celery_app
        self._settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="outbox-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        interval = self._settings.sweep_interval_s
        while not self._stop.wait(interval):
            try:
                if self._store.try_lock("outbox-sweeper", int(interval * 2)):
                    sweep_once(self._store, self._celery, self._settings)
            except DependencyUnavailable as exc:
                log.warning("outbox sweep skipped: %s", exc)
