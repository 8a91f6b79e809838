"""Running one job on a worker: claim it, generate through the model thread, store its
PNGs, finish its record. Safe to run twice for the same job (redelivery)."""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import asdict, dataclass

from PIL import Image

from tasks.errors import FleetError
from tasks.jobs import JobState, Timings
from tasks.storage import ObjectStorage, image_key
from tasks.store import JobStore, now
from workers.metrics import WorkerMetrics
from workers.pipeline import CompatKey, ImageWork
from workers.runner import ModelRunner

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    store: JobStore
    storage: ObjectStorage
    runner: ModelRunner
    model_name: str
    metrics: WorkerMetrics | None = None


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def run_job(ctx: WorkerContext, job_id: str, worker: str, task_id: str = "", queue: str = "") -> str:
    """Run a job to a terminal state; returns the state it ended in (or found it in)."""
    job = ctx.store.get(job_id)
    if job is None:
        log.warning("job %s has no record (expired?); dropping its message", job_id)
        return "MISSING"
    if job.state.terminal:
        return job.state.value  # a duplicate delivery of a finished job

    started_at = now()
    claimed = ctx.store.transition(
        job_id, JobState.RUNNING, started_at=repr(started_at), worker=worker, task_id=task_id
    )
    if not claimed.applied:
        return claimed.state.value if claimed.state else "MISSING"

    spec = job.spec
    key = CompatKey(ctx.model_name, spec.width, spec.height, spec.steps, spec.guidance_scale)
    work = [ImageWork(spec.prompt, spec.negative_prompt, spec.image_seed(i)) for i in range(spec.num_images)]
    deadline = None
    if spec.deadline_ms is not None:  # wall clock -> the runner's monotonic clock
        deadline = time.monotonic() + job.created_at + spec.deadline_ms / 1000 - time.time()
    try:
        result = ctx.runner.submit(key, work, queue=queue, deadline=deadline).result()
    except FleetError as exc:
        return _fail(ctx, job_id, exc.message)
    except Exception as exc:
        log.exception("job %s failed in the model", job_id)
        return _fail(ctx, job_id, f"{type(exc).__name__}: {exc}")

    upload_started = time.monotonic()
    keys = []
    for index, image in enumerate(result.images):
        keys.append(image_key(job_id, index))
        ctx.storage.put_png(keys[-1], encode_png(image))
    upload_s = time.monotonic() - upload_started
    if ctx.metrics:
        ctx.metrics.upload.observe(upload_s)

    finished_at = now()
    timings = Timings(
        queue_wait_s=started_at - job.created_at,
        batch_wait_s=result.batch_wait_s,
        inference_s=result.inference_s,
        upload_s=upload_s,
        total_s=finished_at - job.created_at,
    )
    batch = {"id": result.batch_id, "images": result.batch_images}
    done = ctx.store.transition(
        job_id,
        JobState.SUCCEEDED,
        finished_at=repr(finished_at),
        image_keys=json.dumps(keys),
        timings=json.dumps(asdict(timings)),
        batch=json.dumps(batch),
    )
    return _finished(ctx, done)


def _finished(ctx: WorkerContext, done) -> str:
    state = done.state.value if done.state else "MISSING"
    if ctx.metrics and done.applied:
        ctx.metrics.jobs.labels(state).inc()
    return state


def _fail(ctx: WorkerContext, job_id: str, reason: str) -> str:
    done = ctx.store.transition(job_id, JobState.FAILED, finished_at=repr(now()), error=reason)
    return _finished(ctx, done)
