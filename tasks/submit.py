"""Submitting a job: record it with an outbox entry, publish its message, mark it published.

The one path both the API (a new job) and the outbox sweeper (a job whose message never
went out, or may be lost) take, so the two can never disagree on the order of these steps.
"""

from __future__ import annotations

import time

from celery import Celery

from tasks.celery import publish_job
from tasks.errors import DependencyUnavailable
from tasks.jobs import Job
from tasks.settings import Settings
from tasks.store import JobStore


def submit_job(store: JobStore, celery_app: Celery, settings: Settings, job: Job) -> None:
    """Record a new job and publish it. Raises ``DependencyUnavailable`` when it cannot be
    accepted, leaving no record behind that would stay QUEUED without a message."""
    # With an outbox entry: if this process dies before publishing, a sweeper publishes it.
    store.create(job, publish_by=job.created_at + settings.outbox_grace_s)
    try:
        publish(store, celery_app, settings, job.id, job.queue, job.priority)
    except DependencyUnavailable:
        try:
            store.delete(job)
        except DependencyUnavailable:
            pass  # the sweeper will publish it after all; the job still completes
        raise


def publish(
    store: JobStore, celery_app: Celery, settings: Settings, job_id: str, queue: str, priority: int = 0
) -> None:
    """Send the job's message; if no worker has taken it ``republish_after_s`` later, the
    sweeper sends it again (a duplicate is harmless: a finished job's message is dropped)."""
    publish_job(celery_app, job_id, queue or settings.queue, settings.publish_timeout_s, priority)
    try:
        store.published(job_id, republish_at=time.time() + settings.republish_after_s)
    except DependencyUnavailable:
        pass  # the outbox entry stays due: the sweeper may publish it once more
