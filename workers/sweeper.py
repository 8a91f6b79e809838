"""The outbox sweeper: publishes the message of a QUEUED job that has none.

The API records a job with an outbox entry due ``outbox_grace_s`` later, in one Redis
transaction, then publishes and moves the entry ``republish_after_s`` ahead; a worker's
claim removes it. So an entry falls due only if the API died before publishing, or if no
worker took the job for ``republish_after_s`` (the message may be lost: a broker that lost
its data, a worker killed while taking a message off Redis). Every worker runs this
sweeper; a Redis lock lets one sweep at a time. A duplicate message is harmless: the job
store refuses to finish a job twice, and a finished job's message is dropped.
"""

from __future__ import annotations

import logging
import threading
import time

from celery import Celery

from tasks.cancel import cancel_if_overdue
from tasks.errors import DependencyUnavailable
from tasks.jobs import JobState
from tasks.settings import Settings
from tasks.store import JobStore
from tasks.submit import publish

log = logging.getLogger(__name__)


def sweep_once(store: JobStore, celery_app: Celery, settings: Settings, now: float | None = None) -> int:
    """Publish every job stuck in the outbox; returns how many were published."""
    now = time.time() if now is None else now
    published = 0
    for job_id in store.due_for_publishing(now):
        job = store.get(job_id)
        if job is None or job.state is not JobState.QUEUED:
            store.forget_outbox(job_id)  # expired, or taken by a worker
            continue
        publish(store, celery_app, settings, job_id, job.queue, job.priority)
        log.warning("published job %s again: QUEUED with no worker taking it", job_id)
        published += 1
    return published


def cancel_overdue(store: JobStore, now: float | None = None) -> int:
    """Cancel every QUEUED job whose ``Cancel-After`` deadline has passed; returns how many."""
    now = time.time() if now is None else now
    canceled = 0
    for job_id in store.due_for_canceling(now):
        job = store.get(job_id)
        if job is not None and cancel_if_overdue(store, job, now).state is JobState.CANCELED:
            canceled += job.state is JobState.QUEUED
        store.forget_cancel_after(job_id)  # started, finished or expired: its runner decides
    return canceled


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
                    cancel_overdue(self._store)
            except DependencyUnavailable as exc:
                log.warning("outbox sweep skipped: %s", exc)
