"""The job: what the worker runs, the states it moves through, and its record (what a
client may ask for is ``tasks.request``).

A job is created ``QUEUED`` by the API, moved to ``RUNNING`` by the worker that takes
it, and ends ``SUCCEEDED``, ``FAILED`` or ``CANCELED``. Terminal states never change,
so a message delivered twice can never move a job backwards.
"""

from __future__ import annotations

import enum
import json
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from tasks.registry import load_registry
from tasks.request import WEBHOOK_EVENTS, JobRequest, LoraRequest, WebhookEvent, validate_request
from tasks.settings import ServiceClass, Settings


class JobState(str, enum.Enum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED})

#: state -> the states it may move to. RUNNING -> RUNNING is a redelivery after a worker
#: died mid-job: allowed, and it counts an attempt.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELED}),
    JobState.RUNNING: frozenset({JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELED: frozenset(),
}


def can_move(current: JobState, target: JobState) -> bool:
    return target in TRANSITIONS[current]


OUTPUT_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}


class LoraChoice(BaseModel):
    """One LoRA adapter of the job's model, and how strongly it applies."""

    model_config = ConfigDict(frozen=True)

    name: str
    scale: float


def lora_choices(requested: list[LoraRequest] | None) -> tuple[LoraChoice, ...]:
    """The adapters as the model applies them: by name, an adapter named twice once with its
    scales added (the deltas add up the same way), those whose scale comes to 0 left out:
    jobs that ask for the same thing in another order batch together."""
    scales: dict[str, float] = {}
    for lora in requested or ():
        scales[lora.name] = scales.get(lora.name, 0.0) + lora.scale
    return tuple(LoraChoice(name=name, scale=scale) for name, scale in sorted(scales.items()) if scale != 0)


class GenerationSpec(BaseModel):
    """A validated request with every default filled in: what the worker runs."""

    model_config = ConfigDict(frozen=True)

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    num_images: int
    scheduler: str | None = None  # a diffusers scheduler class name; None: the model's own
    deadline_ms: int | None = None  # best effort: the batcher flushes early rather than miss it
    output_format: Literal["png", "webp", "jpeg"] = "png"
    output_quality: int | None = None  # webp and jpeg; None: the worker's default
    model: str = ""  # its name in the registry (tasks/registry.py); "": before there was one
    loras: tuple[LoraChoice, ...] = ()  # the model's LoRA adapters it applies (``lora_choices``)

    @property
    def content_type(self) -> str:
        return OUTPUT_TYPES[self.output_format]

    def image_seed(self, index: int) -> int:
        """The seed of image ``index``: its noise never depends on its batch neighbours."""
        return (self.seed + index) % 2**63


def parse_request(body: Any, settings: Settings) -> GenerationSpec:
    """Validate a request body against the configured bounds: what the worker runs.
    Raises ``ValidationFailed`` naming the first offending field."""
    return to_spec(validate_request(body, settings), settings)


def to_spec(request: JobRequest, settings: Settings) -> GenerationSpec:
    """A request ``validate_request`` accepted, with every default filled in: the model's
    (``tasks.registry``), which are the fleet's unless its registry entry says otherwise."""
    model = load_registry(settings).get(request.model)
    return GenerationSpec(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        width=model.width if request.width is None else request.width,
        height=model.height if request.height is None else request.height,
        steps=model.steps if request.steps is None else request.steps,
        guidance_scale=float(model.guidance_scale if request.guidance_scale is None else request.guidance_scale),
        seed=secrets.randbelow(2**31) if request.seed is None else request.seed,
        num_images=request.num_images,
        scheduler=request.scheduler,
        deadline_ms=request.deadline_ms,
        output_format=request.output_format,
        output_quality=request.output_quality,
        model=model.name,
        loras=lora_choices(request.loras),
    )


@dataclass(frozen=True)
class JobOptions:
    """How a job is handled, beside what it generates: its queue and its place in it, and
    whom to tell about it."""

    service_class: ServiceClass
    priority: int = 0
    webhook: str | None = None
    webhook_events: tuple[WebhookEvent, ...] = WEBHOOK_EVENTS

    @classmethod
    def of(cls, request: JobRequest, settings: Settings) -> JobOptions:
        return cls(
            service_class=request.service_class or settings.default_service_class,
            priority=request.priority or 0,
            webhook=request.webhook,
            webhook_events=tuple(dict.fromkeys(request.webhook_events)) if request.webhook_events else WEBHOOK_EVENTS,
        )


def new_job_id() -> str:
    """128 random bits: image keys derived from it cannot be guessed."""
    return secrets.token_hex(16)


@dataclass
class Timings:
    """Seconds spent in each phase of a finished job."""

    queue_wait_s: float | None = None
    batch_wait_s: float | None = None
    inference_s: float | None = None
    upload_s: float | None = None
    total_s: float | None = None


@dataclass(frozen=True)
class BatchInfo:
    """The model call a job's (last) images ran in."""

    id: str
    images: int


@dataclass(frozen=True)
class JobUpdate:
    """Fields a state change writes along with the new state; ``None`` leaves a field as it
    is. The one place that knows how each field is encoded in the job's Redis hash."""

    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    worker: str | None = None
    task_id: str | None = None
    image_keys: list[str] | None = None
    timings: Timings | None = None
    batch: BatchInfo | None = None

    def to_redis(self) -> dict[str, str]:
        encode: dict[str, Callable[[Any], str]] = {
            "started_at": repr,
            "finished_at": repr,
            "error": str,
            "worker": str,
            "task_id": str,
            "image_keys": json.dumps,
            "timings": lambda timings: json.dumps(asdict(timings)),
            "batch": lambda batch: json.dumps(asdict(batch)),
        }
        return {name: encode[name](value) for name, value in vars(self).items() if value is not None}


@dataclass
class Job:
    """A job record as stored and as returned by ``GET /v1/jobs/<id>``."""

    id: str
    state: JobState
    spec: GenerationSpec
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0  # deliveries to a worker
    crashes: int = 0  # model calls it was in when its worker died
    queue: str = ""
    error: str | None = None
    worker: str | None = None
    task_id: str | None = None  # the Celery task that last ran it (Flower's id)
    image_keys: list[str] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)
    batch: BatchInfo | None = None
    step: int = 0  # denoising steps done in its current model call, of ``total_steps``
    total_steps: int = 0
    cancel_at: float | None = None  # canceled if not started by then (``Cancel-After``)
    owner: str = ""  # the name of the API key that submitted it
    priority: int = 0
    webhook: str | None = None
    webhook_events: tuple[WebhookEvent, ...] = ()

    def to_redis(self) -> dict[str, str]:
        raw = {
            "id": self.id,
            "state": self.state.value,
            "spec": self.spec.model_dump_json(),
            "created_at": repr(self.created_at),
            "attempts": str(self.attempts),
            "crashes": str(self.crashes),
            "queue": self.queue,
        }
        if self.cancel_at is not None:
            raw["cancel_at"] = repr(self.cancel_at)
        if self.owner:
            raw["owner"] = self.owner
        if self.priority:
            raw["priority"] = str(self.priority)
        if self.webhook:
            raw["webhook"] = self.webhook
            raw["webhook_events"] = ",".join(self.webhook_events)
        update = JobUpdate(
            started_at=self.started_at,
            finished_at=self.finished_at,
            error=self.error,
            worker=self.worker,
            task_id=self.task_id,
            image_keys=self.image_keys,
            timings=self.timings,
            batch=self.batch,
        )
        return raw | update.to_redis()

    @classmethod
    def from_redis(cls, raw: dict[str, str]) -> Job:
        def opt_float(name: str) -> float | None:
            return float(raw[name]) if raw.get(name) else None

        return cls(
            id=raw["id"],
            state=JobState(raw["state"]),
            spec=GenerationSpec.model_validate_json(raw["spec"]),
            created_at=float(raw["created_at"]),
            started_at=opt_float("started_at"),
            finished_at=opt_float("finished_at"),
            attempts=int(raw.get("attempts", 0)),
            crashes=int(raw.get("crashes", 0)),
            queue=raw.get("queue", ""),
            error=raw.get("error"),
            worker=raw.get("worker"),
            task_id=raw.get("task_id"),
            image_keys=json.loads(raw.get("image_keys", "[]")),
            timings=Timings(**json.loads(raw.get("timings", "{}"))),
            batch=BatchInfo(**json.loads(raw["batch"])) if raw.get("batch") else None,
            step=int(raw.get("step", 0)),
            total_steps=int(raw.get("total_steps", 0)),
            cancel_at=opt_float("cancel_at"),
            owner=raw.get("owner", ""),
            priority=int(raw.get("priority", 0)),
            webhook=raw.get("webhook"),
            webhook_events=tuple(e for e in WEBHOOK_EVENTS if e in raw.get("webhook_events", "").split(",")),
        )
