"""Running one job on a worker: claim it, generate through the model thread, store its
PNGs, finish its record. Safe to run twice for the same job (redelivery).

What can go wrong, and what happens (docs/RELIABILITY.md has the tests):

- the job is already finished (a duplicate message): nothing runs, the message is acked;
- it was in a model call when a worker or an engine died ``max_attempts`` times: it ends
  FAILED without running again; a job that was in such a call runs alone from then on, so
  it cannot take its neighbours down with it (an engine death is seen here at once, as
  ``EngineCrashed``; a worker death on the job's next delivery);
- the model raises: the batch was split until this job failed alone; it ends FAILED;
- storage or the job store are down: retried with backoff for ``retry_window_s``; then
  the job ends FAILED (storage), or its message is handed back for later (job store,
  since nothing could be recorded);
- the worker is stopping and the job had not started: its message is handed back;
- the job is canceled (``tasks.cancel``): it stops or leaves its batch, stores nothing and
  stays CANCELED; one whose ``Cancel-After`` deadline passes before a call starts it ends
  CANCELED too.
"""

from __future__ import annotations

import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tasks.cancel import cancel_if_overdue
from tasks.errors import DependencyUnavailable, EngineCrashed, FleetError, JobCanceled, JobError
from tasks.jobs import BatchInfo, Job, JobState, JobUpdate, Timings
from tasks.settings import Settings
from tasks.storage import ObjectStorage, image_key
from tasks.store import JobStore, TransitionResult, now
from workers.cancels import CancelListener
from workers.metrics import WorkerMetrics
from workers.retry import with_retries
from workers.runner import JobReleased, JobResult, ModelRunner
from workers.work import CompatKey, ImageWork

log = logging.getLogger(__name__)


class HandBack(Exception):
    """The job's message must go back to the queue (not acknowledged)."""


@dataclass
class WorkerContext:
    store: JobStore
    storage: ObjectStorage
    runner: ModelRunner
    settings: Settings
    metrics: WorkerMetrics | None = None
    #: Encodes and uploads the images of a multi-image job side by side.
    uploads: ThreadPoolExecutor | None = None
    #: Drops jobs canceled through the API from the runner (``workers.cancels``).
    cancels: CancelListener | None = None

    def retrying(self, call, what: str):
        return with_retries(call, self.settings.retry_window_s, self.settings.retry_backoff_s, what)


#: Quality of webp and jpeg images when the request gives none.
DEFAULT_QUALITY = 90


def encode_png(image: np.ndarray, compress_level: int = 6) -> bytes:
    return encode_image(image, "png", png_compress_level=compress_level)


def encode_image(
    image: np.ndarray, output_format: str, quality: int | None = None, png_compress_level: int = 6
) -> bytes:
    """One ``(height, width, 3)`` uint8 image as PNG, WebP or JPEG. Pillow releases the
    GIL while it compresses, so images encode in parallel on threads."""
    buf = io.BytesIO()
    if output_format == "png":
        Image.fromarray(image).save(buf, format="PNG", compress_level=png_compress_level)
    else:
        Image.fromarray(image).save(buf, format=output_format.upper(), quality=quality or DEFAULT_QUALITY)
    return buf.getvalue()


def run_job(ctx: WorkerContext, job_id: str, worker: str, task_id: str = "", queue: str = "") -> str:
    """Run a job to a terminal state; returns the state it ended in (or found it in).

    Raises ``HandBack`` when the message must be returned to the queue.
    """
    try:
        job = ctx.retrying(lambda: ctx.store.get(job_id), "reading the job")
    except DependencyUnavailable as exc:
        raise HandBack(f"job store unavailable: {exc.message}") from exc
    if job is None:
        log.warning("job %s has no record (expired?); dropping its message", job_id)
        return "MISSING"
    job = ctx.retrying(lambda: cancel_if_overdue(ctx.store, job), "canceling an overdue job")
    if job.state.terminal:
        return job.state.value  # a duplicate delivery of a finished (or canceled) job

    if job.crashes >= ctx.settings.max_attempts:
        return _fail(ctx, job_id, _gave_up(job.crashes))

    started_at = now()
    claimed = _record(ctx, job_id, JobState.RUNNING, JobUpdate(started_at=started_at, worker=worker, task_id=task_id))
    if not claimed.applied:
        return claimed.state.value if claimed.state else "MISSING"

    try:
        result = _generate(ctx, job, queue)
    except JobReleased as exc:
        _release(ctx, job_id)
        raise HandBack(str(exc)) from exc
    except JobCanceled as exc:  # by its client (already CANCELED) or its deadline
        return _finished(ctx, _record(ctx, job_id, JobState.CANCELED, JobUpdate(finished_at=now(), error=exc.message)))
    except FleetError as exc:
        return _fail(ctx, job_id, exc.message)
    except Exception as exc:
        log.exception("job %s failed in the model", job_id)
        return _fail(ctx, job_id, f"{type(exc).__name__}: {exc}")

    try:
        keys, upload_s = _upload(ctx, job_id, result)
    except DependencyUnavailable as exc:
        return _fail(ctx, job_id, f"could not store the images for {ctx.settings.retry_window_s:.0f}s: {exc.message}")
    if keys is None:  # a duplicate run finished it, or its client canceled it, meanwhile
        latest = ctx.retrying(lambda: ctx.store.get(job_id), "reading the job")
        return latest.state.value if latest else "MISSING"

    finished_at = now()
    timings = Timings(
        queue_wait_s=started_at - job.created_at,
        batch_wait_s=result.batch_wait_s,
        inference_s=result.inference_s,
        upload_s=upload_s,
        total_s=finished_at - job.created_at,
    )
    done = _record(
        ctx,
        job_id,
        JobState.SUCCEEDED,
        JobUpdate(
            finished_at=finished_at,
            image_keys=keys,
            timings=timings,
            batch=BatchInfo(result.batch_id, result.batch_images),
        ),
    )
    if not done.applied and done.state is JobState.CANCELED:
        _discard(ctx, job_id, keys)
    return _finished(ctx, done)


def _gave_up(crashes: int) -> str:
    return f"gave up: its worker or engine died {crashes} times while running this job"


def _generate(ctx: WorkerContext, job: Job, queue: str) -> JobResult:
    spec = job.spec
    key = CompatKey(ctx.runner.model_name, spec.width, spec.height, spec.steps, spec.guidance_scale)
    work = [ImageWork(spec.prompt, spec.negative_prompt, spec.image_seed(i)) for i in range(spec.num_images)]
    deadline = None
    if spec.deadline_ms is not None:
        deadline = _monotonic(job.created_at + spec.deadline_ms / 1000)
    expires_at = _monotonic(job.cancel_at) if job.cancel_at is not None else None
    crashes = job.crashes
    while True:
        future = ctx.runner.submit(
            key, work, queue=queue, deadline=deadline, tag=job.id, isolated=crashes > 0, expires_at=expires_at
        )
        try:
            return future.result()
        except EngineCrashed as exc:
            current = ctx.retrying(lambda: ctx.store.get(job.id), "reading the job")
            # The store counted it when the call started; never less than one more than
            # before, so a lost count cannot loop a poison job forever.
            crashes = max(current.crashes if current is not None else 0, crashes + 1)
            if crashes >= ctx.settings.max_attempts:
                raise JobError(_gave_up(crashes)) from exc
            log.warning("job %s was in a call the engine died in (%d so far): running it alone", job.id, crashes)


def _monotonic(wall_clock: float) -> float:
    """A wall-clock time (the job store's) on the runner's monotonic clock."""
    return time.monotonic() + wall_clock - time.time()


def _discard(ctx: WorkerContext, job_id: str, keys: list[str]) -> None:
    """The job was canceled while its images uploaded: a CANCELED job stores nothing."""
    try:
        ctx.retrying(lambda: ctx.storage.delete(keys), "deleting a canceled job's images")
    except DependencyUnavailable as exc:
        log.warning("job %s was canceled but its images could not be deleted: %s", job_id, exc.message)


def _upload(ctx: WorkerContext, job_id: str, result: JobResult) -> tuple[list[str] | None, float]:
    started = time.monotonic()
    current = ctx.retrying(lambda: ctx.store.get(job_id), "reading the job")
    if current is not None and current.state.terminal:
        return None, 0.0  # never overwrite the images of a finished job
    level, spec = ctx.settings.png_compress_level, current.spec if current is not None else None
    fmt, quality = (spec.output_format, spec.output_quality) if spec else ("png", None)
    content_type = spec.content_type if spec else "image/png"

    def store(index: int) -> str:
        key = image_key(job_id, index, fmt)
        data = encode_image(result.images[index], fmt, quality, png_compress_level=level)
        ctx.retrying(lambda: ctx.storage.put_image(key, data, content_type), f"uploading {key}")
        return key

    indexes = range(len(result.images))
    keys = list(ctx.uploads.map(store, indexes) if ctx.uploads and len(indexes) > 1 else map(store, indexes))
    upload_s = time.monotonic() - started
    if ctx.metrics:
        ctx.metrics.upload.observe(upload_s)
    return keys, upload_s


def _record(ctx: WorkerContext, job_id: str, target: JobState, update: JobUpdate) -> TransitionResult:
    try:
        return ctx.retrying(lambda: ctx.store.transition(job_id, target, update), f"recording {target.value}")
    except DependencyUnavailable as exc:
        raise HandBack(f"job store unavailable: {exc.message}") from exc


def _release(ctx: WorkerContext, job_id: str) -> None:
    try:
        ctx.store.release(job_id)
    except DependencyUnavailable:
        log.warning("could not release job %s; its next delivery counts as a retry", job_id)


def _finished(ctx: WorkerContext, done: TransitionResult) -> str:
    state = done.state.value if done.state else "MISSING"
    if ctx.metrics and done.applied:
        ctx.metrics.jobs.labels(state).inc()
    return state


def _fail(ctx: WorkerContext, job_id: str, reason: str) -> str:
    return _finished(ctx, _record(ctx, job_id, JobState.FAILED, JobUpdate(finished_at=now(), error=reason)))
