"""The job as clients see it: one model for the API's responses, its OpenAPI document and
the load generator that reads them back."""

from __future__ import annotations

import time
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, Field

from tasks.jobs import BatchInfo, GenerationSpec, Job, JobState, Timings
from tasks.storage import ObjectStorage, image_key
from tasks.store import QueuePlace


class ImageLink(BaseModel):
    """A presigned download URL of one image, signed when the job was read."""

    url: str
    expires_in_s: int
    expires_at: datetime


class BatchView(BaseModel):
    """The model call the job's (last) images ran in. With step-level batching (a queue's
    ``batching`` is "step") ``id`` names the batch the job joined the running ones with,
    and ``images`` is the mean images of the model calls its steps ran in, rounded."""

    id: str
    images: int


class ProgressView(BaseModel):
    """Denoising steps done in the model call a RUNNING job is in."""

    step: int
    total: int


class PlaceInLine(BaseModel):
    """Where a QUEUED job stands: ``position`` jobs of its queue are ahead of it, and it
    should start (be taken by a worker) around ``estimated_start_at``.

    The estimate (``estimate``): a worker takes a job as soon as it has a free task thread,
    so the jobs that fit the free threads start now, and each one after them waits for the
    next start, at the rate the queue finished jobs lately (``r`` jobs/s over the last two
    minutes). The workers consuming the queue say so in the job store every few seconds,
    with their task threads (``JobStore.announce``): with ``s`` threads among them, of which
    ``running`` hold jobs of this queue, ``free = s - running`` (none when negative):
    position ``p < free`` starts now, any other at ``now + (p - free + 1) / r``. So a job
    at position 0 on an idle worker starts now, not one average job time later, and a busy
    queue (no free thread) keeps ``(p + 1) / r``. Null when it must wait and there is no
    rate to wait at (no worker consumes the queue, or none finished a job lately)."""

    position: int
    estimated_start_at: datetime | None = None

    @classmethod
    def estimate(cls, place: QueuePlace, now: float) -> PlaceInLine:
        """The job's place and its estimated start, from what the store says of its queue."""
        free = max(0, place.threads - place.running)
        if place.position < free:
            start: float | None = now
        elif place.jobs_per_s > 0:
            start = now + (place.position - free + 1) / place.jobs_per_s
        else:
            start = None
        return cls(position=place.position, estimated_start_at=_utc(start))


class TimingsView(BaseModel):
    """Seconds spent in each phase of a finished job."""

    queue_wait_s: float | None = None
    batch_wait_s: float | None = None
    inference_s: float | None = None
    upload_s: float | None = None
    total_s: float | None = None


class JobView(BaseModel):
    """The body of ``GET /v1/jobs/<id>`` and of the ``202`` that accepts a job."""

    id: str = Field(pattern=r"^[0-9a-f]{32}$")
    state: JobState
    request: GenerationSpec
    queue: str = ""  # its service class's queue
    priority: int = 0
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    crashes: int = 0
    timings: TimingsView = TimingsView()
    batch: BatchView | None = None
    worker: str | None = None
    task_id: str | None = None
    error: str | None = None
    images: list[ImageLink] = []
    progress: ProgressView | None = None
    place_in_line: PlaceInLine | None = None
    cancel_at: datetime | None = None

    @classmethod
    def of(cls, job: Job, images: list[ImageLink] | None = None, place: PlaceInLine | None = None) -> JobView:
        return cls(
            id=job.id,
            state=job.state,
            request=job.spec,
            queue=job.queue,
            priority=job.priority,
            created_at=_utc(job.created_at),
            started_at=_utc(job.started_at),
            finished_at=_utc(job.finished_at),
            attempts=job.attempts,
            crashes=job.crashes,
            timings=TimingsView(**asdict(job.timings)),
            batch=BatchView(id=job.batch.id, images=job.batch.images) if job.batch else None,
            worker=job.worker,
            task_id=job.task_id,
            error=job.error,
            images=images or [],
            progress=ProgressView(step=job.step, total=job.total_steps) if job.total_steps else None,
            place_in_line=place,
            cancel_at=_utc(job.cancel_at),
        )

    def to_job(self) -> Job:
        """The record this view shows (what a client without job-store access knows)."""
        return Job(
            id=self.id,
            state=self.state,
            spec=self.request,
            queue=self.queue,
            priority=self.priority,
            created_at=self.created_at.timestamp(),
            started_at=self.started_at.timestamp() if self.started_at else None,
            finished_at=self.finished_at.timestamp() if self.finished_at else None,
            attempts=self.attempts,
            crashes=self.crashes,
            error=self.error,
            worker=self.worker,
            task_id=self.task_id,
            image_keys=[image_key(self.id, i, self.request.output_format) for i in range(len(self.images))],
            timings=Timings(**self.timings.model_dump()),
            batch=BatchInfo(self.batch.id, self.batch.images) if self.batch else None,
            step=self.progress.step if self.progress else 0,
            total_steps=self.progress.total if self.progress else 0,
            cancel_at=self.cancel_at.timestamp() if self.cancel_at else None,
        )


def _utc(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc)


def render(job: Job, storage: ObjectStorage, place: PlaceInLine | None = None) -> dict[str, Any]:
    """The job as JSON, with a fresh presigned URL per image once it succeeded."""
    images = []
    if job.state is JobState.SUCCEEDED:
        for key in job.image_keys:
            signed = storage.presign(key)
            expires_at = datetime.fromtimestamp(time.time() + signed.expires_in_s, timezone.utc)
            images.append(ImageLink(url=signed.url, expires_in_s=signed.expires_in_s, expires_at=expires_at))
    return JobView.of(job, images, place).model_dump(mode="json")
