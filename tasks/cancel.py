"""Canceling a job: by its client (``POST /v1/jobs/<id>/cancel``) or by its ``Cancel-After``
deadline passing before it started.

The job store is the authority: a cancel is the state change to ``CANCELED``, which the
store refuses once the job has finished, and publishes (``tasks.events``) when it applies.
A worker that holds the job hears that event and drops it (``workers.runner``): a queued
job never runs; a running one stops at its next step boundary when its batch is its own,
or leaves a shared batch, its images discarded, its neighbours untouched. Had the event
been missed, the job still ends ``CANCELED`` with nothing stored: the worker checks the
state before storing images and deletes any that a race let through.
"""

from __future__ import annotations

import re
import time

from tasks.errors import Conflict, ValidationFailed
from tasks.jobs import Job, JobState, JobUpdate
from tasks.store import JobStore

CANCELED_BY_CLIENT = "canceled by its client"
NOT_STARTED_IN_TIME = "canceled: not started before its Cancel-After deadline"

#: ``Cancel-After`` bounds, seconds: a shorter or longer deadline is moved to the nearest one
#: (the job's ``cancel_at`` shows the deadline applied). Clamped, not refused, so that the
#: header's pattern (which cannot add up units) is the whole rule: every duration it allows
#: is accepted.
MIN_CANCEL_AFTER_S = 1.0
MAX_CANCEL_AFTER_S = 24 * 3600.0

_NUMBER = r"[0-9]+(?:\.[0-9]+)?"
_PART = re.compile(rf"({_NUMBER})(ms|h|m|s)")
#: ``90``, ``90s``, ``1m30s``, ``500ms``, ``2h`` (as Replicate's header).
CANCEL_AFTER_PATTERN = rf"^[\t ]*(?:{_NUMBER}|(?:{_NUMBER}(?:ms|h|m|s))+)[\t ]*$"
_DURATION = re.compile(CANCEL_AFTER_PATTERN)
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str, field: str = "Cancel-After") -> float:
    """A duration in seconds, clamped to ``MIN_CANCEL_AFTER_S``..``MAX_CANCEL_AFTER_S``."""
    if not _DURATION.fullmatch(text):
        raise ValidationFailed(f"'{field}' must be a duration like 30s, 5m or 1m30s, got '{text}'", field)
    text = text.strip(" \t")
    parts = _PART.findall(text)
    seconds = sum(float(n) * _UNIT_S[u] for n, u in parts) if parts else float(text)
    return min(max(seconds, MIN_CANCEL_AFTER_S), MAX_CANCEL_AFTER_S)


def cancel(store: JobStore, job: Job) -> Job:
    """The client's cancel: idempotent for a job already CANCELED; ``Conflict`` for one
    that SUCCEEDED or FAILED first."""
    result = store.transition(job.id, JobState.CANCELED, JobUpdate(finished_at=time.time(), error=CANCELED_BY_CLIENT))
    if not result.applied and result.state is not JobState.CANCELED:
        state = result.state.value if result.state else "expired"
        raise Conflict(f"job {job.id} is already {state}", field="job_id")
    return store.get(job.id) or job


def cancel_if_overdue(store: JobStore, job: Job, now: float | None = None) -> Job:
    """Cancel a QUEUED job whose ``Cancel-After`` deadline has passed; returns it as it is
    now. Called by readers of the job and by the sweeper, so the deadline holds even while
    no worker takes the job."""
    now = time.time() if now is None else now
    if job.state is not JobState.QUEUED or job.cancel_at is None or now < job.cancel_at:
        return job
    result = store.transition(
        job.id,
        JobState.CANCELED,
        JobUpdate(finished_at=now, error=NOT_STARTED_IN_TIME),
        only_from=frozenset({JobState.QUEUED}),
    )
    if result.applied:
        store.forget_cancel_after(job.id)
    return store.get(job.id) or job
