"""Running one job on a worker: claim it, generate through the runner and its engine, store its
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

import dataclasses
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tasks.cancel import cancel_if_overdue
from tasks.errors import DependencyUnavailable, EngineCrashed, FleetError, JobCanceled, JobError
from tasks.jobs import BatchInfo, GenerationSpec, Job, JobState, JobUpdate, Timings
from tasks.logs import bind_log_context
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


#: Why a job ended FAILED, as a metric label and in its task's result (bounded values; the
#: job record keeps the full message).
CRASHED = "crashed"  # its worker or engine died in its calls FLEET_MAX_ATTEMPTS times
STORAGE = "storage"  # its images could not be stored within the retry window
INTERNAL = "internal"  # an unexpected exception (a bug): the worker's log has the traceback


@dataclass(frozen=True)
class JobOutcome:
    """How one delivery of a job ended: the state the job is in, the model call it ran in,
    and why it failed. ``summary`` is the task's result, which Flower shows: never the
    prompt, only ids, counts and bounded reasons."""

    state: JobState | None  # None: the job has no record (it expired, or never was)
    batch_id: str | None = None
    batch_images: int = 0
    reason: str | None = None  # a FAILED job's reason code
    duplicate: bool = False  # another delivery finished (or runs) the job: this one did nothing
    model: str = ""  # the model its batch ran (its registry name)

    def summary(self) -> str:
        text = self.state.value if self.state is not None else "MISSING"
        if self.batch_id:
            text += f" batch {self.batch_id} ({self.batch_images} image{'s' * (self.batch_images != 1)})"
        if self.batch_id and self.model:
            text += f" on {self.model}"
        if self.reason:
            text += f" ({self.reason})"
        if self.duplicate:
            text += ", duplicate delivery"
        return text


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


def run_job(ctx: WorkerContext, job_id: str, worker: str, task_id: str = "", queue: str = "") -> JobOutcome:
    """Run a job to a terminal state; returns how it ended (or how it was found).

    Raises ``HandBack`` when the message must be returned to the queue. Logs each step with
    the job's id (and, once known, its batch's: ``tasks.logs``).
    """
    try:
        job = ctx.retrying(lambda: ctx.store.get(job_id), "reading the job")
    except DependencyUnavailable as exc:
        raise HandBack(f"job store unavailable: {exc.message}") from exc
    if job is None:
        log.warning("job %s has no record (expired?); dropping its message", job_id)
        return JobOutcome(None)
    job = ctx.retrying(lambda: cancel_if_overdue(ctx.store, job), "canceling an overdue job")
    if job.state.terminal:  # a duplicate delivery of a finished (or canceled) job
        log.info("job %s is already %s: nothing to do", job_id, job.state.value)
        return _recorded(job, duplicate=True)

    if job.crashes >= ctx.settings.max_attempts:
        return _fail(ctx, job_id, _gave_up(job.crashes), CRASHED)

    started_at = now()
    claimed = _record(ctx, job_id, JobState.RUNNING, JobUpdate(started_at=started_at, worker=worker, task_id=task_id))
    if not claimed.applied:
        state = claimed.state.value if claimed.state else "gone"
        log.info("job %s is %s elsewhere: this delivery does nothing", job_id, state)
        return JobOutcome(claimed.state, duplicate=True)
    if ctx.metrics:
        ctx.metrics.queue_wait.observe(max(0.0, started_at - job.created_at))
    log.info(
        "job %s running on %s (queue %s, attempt %d)",
        job_id, worker, queue or job.queue, job.attempts + 1,
        extra={"queue": queue or job.queue, "attempt": job.attempts + 1, "images": job.spec.num_images},
    )  # fmt: skip

    try:
        result = _generate(ctx, job, queue)
    except JobReleased as exc:
        _release(ctx, job_id)
        raise HandBack(str(exc)) from exc
    except JobCanceled as exc:  # by its client (already CANCELED) or its deadline
        done = _record(ctx, job_id, JobState.CANCELED, JobUpdate(finished_at=now(), error=exc.message))
        return _finished(ctx, job_id, done)
    except FleetError as exc:
        return _fail(ctx, job_id, exc.message, exc.code)
    except Exception as exc:
        log.exception("job %s failed in the model", job_id)
        return _fail(ctx, job_id, f"{type(exc).__name__}: {exc}", INTERNAL)
    bind_log_context(batch_id=result.batch_id)
    log.info(
        "job %s ran in batch %s of %d image(s): waited %.3fs, model %.3fs",
        job_id, result.batch_id, result.batch_images, result.batch_wait_s, result.inference_s,
        extra={"batch_images": result.batch_images, "batch_wait_s": result.batch_wait_s,
               "inference_s": result.inference_s},
    )  # fmt: skip

    try:
        keys, upload_s = _upload(ctx, job_id, job.spec, result)
    except DependencyUnavailable as exc:
        reason = f"could not store the images for {ctx.settings.retry_window_s:.0f}s: {exc.message}"
        return _fail(ctx, job_id, reason, STORAGE)
    if keys is None:  # a duplicate run finished it, or its client canceled it, meanwhile
        latest = ctx.retrying(lambda: ctx.store.get(job_id), "reading the job")
        return _recorded(latest, duplicate=True) if latest else JobOutcome(None)
    log.info(
        "job %s uploaded %d image(s) in %.3fs", job_id, len(keys), upload_s,
        extra={"upload_s": upload_s, "image_keys": keys},
    )  # fmt: skip

    finished_at = now()
    total_s = finished_at - job.created_at
    timings = Timings(
        queue_wait_s=started_at - job.created_at,
        batch_wait_s=result.batch_wait_s,
        inference_s=result.inference_s,
        upload_s=upload_s,
        total_s=total_s,
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
    outcome = _finished(ctx, job_id, done, total_s=total_s)
    if ctx.metrics and done.applied and done.state is JobState.SUCCEEDED:
        ctx.metrics.job_total.observe(total_s)
    if outcome.state is JobState.SUCCEEDED:
        return dataclasses.replace(
            outcome, batch_id=result.batch_id, batch_images=result.batch_images, model=job.spec.model
        )
    return outcome


def _recorded(job: Job, duplicate: bool = False) -> JobOutcome:
    """The outcome a job's record shows (a later delivery of a finished job). A job its
    client canceled is just CANCELED: no other delivery finished it."""
    duplicate = duplicate and job.state is not JobState.CANCELED
    batch_id, batch_images = (job.batch.id, job.batch.images) if job.batch else (None, 0)
    return JobOutcome(job.state, batch_id, batch_images, duplicate=duplicate, model=job.spec.model)


class GaveUp(JobError):
    """Its worker or engine died in its model calls ``max_attempts`` times."""

    code = CRASHED


def _gave_up(crashes: int) -> str:
    return f"gave up: its worker or engine died {crashes} times while running this job"


def _generate(ctx: WorkerContext, job: Job, queue: str) -> JobResult:
    spec = job.spec
    key = CompatKey(
        spec.model or ctx.runner.model_name,  # "": a job from before the registry, the first model
        spec.width,
        spec.height,
        spec.steps,
        spec.guidance_scale,
        spec.scheduler,
        tuple((lora.name, lora.scale) for lora in spec.loras),
    )
    work = [ImageWork(spec.prompt, spec.negative_prompt, spec.image_seed(i)) for i in range(spec.num_images)]
    deadline = None
    if spec.deadline_ms is not None:
        deadline = _monotonic(job.created_at + spec.deadline_ms / 1000)
    expires_at = _monotonic(job.cancel_at) if job.cancel_at is not None else None
    crashes = job.crashes
    while True:
        future = ctx.runner.submit(
            key, work, queue=queue, deadline=deadline, job_id=job.id, isolated=crashes > 0, expires_at=expires_at
        )
        try:
            return future.result()
        except EngineCrashed as exc:
            current = ctx.retrying(lambda: ctx.store.get(job.id), "reading the job")
            # The store counted it when the call started; never less than one more than
            # before, so a lost count cannot loop a poison job forever.
            crashes = max(current.crashes if current is not None else 0, crashes + 1)
            if crashes >= ctx.settings.max_attempts:
                raise GaveUp(_gave_up(crashes)) from exc
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


def _upload(ctx: WorkerContext, job_id: str, spec: GenerationSpec, result: JobResult) -> tuple[list[str] | None, float]:
    started = time.monotonic()
    current = ctx.retrying(lambda: ctx.store.get(job_id), "reading the job")
    if current is not None and current.state.terminal:
        return None, 0.0  # never overwrite the images of a finished job
    level, fmt, quality = ctx.settings.png_compress_level, spec.output_format, spec.output_quality

    def store(index: int) -> str:
        key = image_key(job_id, index, fmt)
        data = encode_image(result.images[index], fmt, quality, png_compress_level=level)
        ctx.retrying(lambda: ctx.storage.put_image(key, data, spec.content_type), f"uploading {key}")
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


def _finished(ctx: WorkerContext, job_id: str, done: TransitionResult, reason: str | None = None,
              total_s: float | None = None) -> JobOutcome:  # fmt: skip
    state = done.state.value if done.state else "gone"
    if done.applied:
        if ctx.metrics:
            ctx.metrics.jobs.labels(state).inc()
            if reason:
                ctx.metrics.failures.labels(reason).inc()
        extra = {"state": state} | ({"reason": reason} if reason else {}) | ({"total_s": total_s} if total_s else {})
        log.log(logging.WARNING if reason else logging.INFO, "job %s %s%s", job_id, state,
                f" ({reason})" if reason else "", extra=extra)  # fmt: skip
        return JobOutcome(done.state, reason=reason)
    return JobOutcome(done.state, duplicate=done.state is not JobState.CANCELED)  # another delivery finished it


def _fail(ctx: WorkerContext, job_id: str, message: str, reason: str) -> JobOutcome:
    done = _record(ctx, job_id, JobState.FAILED, JobUpdate(finished_at=now(), error=message))
    return _finished(ctx, job_id, done, reason=reason)
