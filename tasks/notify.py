"""A job's webhook deliveries, from its changes: ``start`` when a worker takes it,
``progress`` as its model call steps (at most one a second per job, and always the last
step), ``completed`` when it ends (SUCCEEDED, FAILED or CANCELED, whoever ended it).

The job store calls ``state_changed`` after every state change it applies to a job with a
webhook, in whichever process made it (API, worker, sweeper), so no path that ends a job
can forget to tell. Each delivery's id is stable (``<job>.<event>.<n>``): a receiver
deduplicates on it, and ``fleet hooks`` retries with the same id.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from celery import Celery

from tasks.jobs import Job, JobState
from tasks.request import WebhookEvent
from tasks.settings import Settings
from tasks.store import JobStore
from tasks.webhooks import send_webhook

#: Progress deliveries per job: at most one per this many seconds (and the last step).
PROGRESS_INTERVAL_S = 1.0


class Notifier:
    def __init__(
        self, store: JobStore, celery_app: Celery, settings: Settings, render: Callable[[Job], dict[str, Any]]
    ):
        self._store = store
        self._celery = celery_app
        self._settings = settings
        self._render = render
        self._lock = threading.Lock()
        self._last_progress: dict[str, float] = {}
        store.on_change(self.state_changed)

    def state_changed(self, job_id: str, state: JobState) -> None:
        event: WebhookEvent | None = "start" if state is JobState.RUNNING else "completed" if state.terminal else None
        job = self._store.get(job_id) if event else None
        if job is None or not job.webhook or event not in job.webhook_events:
            return
        suffix = str(job.attempts) if event == "start" else "end"
        self._send(job, event, f"{job.id}.{event}.{suffix}", self._render(job))
        if state.terminal:
            with self._lock:
                self._last_progress.pop(job_id, None)

    def progressed(self, job_ids: list[str], step: int, total: int) -> None:
        """``job_ids``: those whose webhook wants progress (``JobStore.progress`` says)."""
        now = time.monotonic()
        for job_id in job_ids:
            with self._lock:
                due = step >= total or now - self._last_progress.get(job_id, float("-inf")) >= PROGRESS_INTERVAL_S
                if due:
                    self._last_progress[job_id] = now
            job = self._store.get(job_id) if due else None
            if job is not None and job.webhook:
                data = {"id": job_id, "step": step, "total": total}
                self._send(job, "progress", f"{job_id}.progress.{job.attempts}-{step}", data)

    def _send(self, job: Job, event: WebhookEvent, delivery_id: str, data: dict[str, Any]) -> None:
        send_webhook(
            self._celery, self._settings, url=job.webhook or "", owner=job.owner, event=event, data=data,
            delivery_id=delivery_id,
        )  # fmt: skip
