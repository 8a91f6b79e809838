"""The models as clients see them: what ``GET /v1/models`` answers (``app.models``), in
OpenAI's shape with the fleet's fields beside it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from tasks.schedulers import SchedulerName


class QueueState(BaseModel):
    """One queue of a model: its jobs and the workers consuming it now."""

    name: str
    queued: int
    running: int
    workers: int


class ModelState(BaseModel):
    workers: int  # live workers serving the model (on any of its queues)
    queues: list[QueueState]


class ModelView(BaseModel):
    """A model of the registry as ``GET /v1/models`` shows it: OpenAI's model object, then
    the fleet's fields."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0  # OpenAI's field; the fleet does not track it
    owned_by: str = "diffusion-fleet"
    default: bool
    description: str
    width: int  # the default size
    height: int
    steps: int  # the default steps, within min_steps..max_steps
    min_steps: int
    max_steps: int
    guidance_scale: float  # the default
    schedulers: list[SchedulerName]  # what a request may name; []: only the model's own (null)
    loras: list[str]  # the LoRA adapters a request may apply, by name
    dtype: str
    quantize: str
    state: ModelState


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelView]
