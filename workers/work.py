"""What the model is asked to do: plain types, no torch, shared by the worker process, the
engine process and every model backend."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from tasks.settings import WarmShape


@dataclass(frozen=True)
class CompatKey:
    """Jobs that share these can share one model call."""

    model: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str | None = None  # a diffusers scheduler class name; None: the model's own
    #: LoRA adapters and their scales, by name (``tasks.jobs.LoraChoice``); (): none
    loras: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class BatchKey:
    """Which waiting images the batcher may put in one call: the same queue (its batching
    policy) and the same compat key. ``alone`` names a job that must run in batches of its
    own: it was in a model call the engine or the worker died in, so it cannot take its
    neighbours down with it again."""

    queue: str
    compat: CompatKey
    alone: str | None = None

    @property
    def shared(self) -> BatchKey:
        """The key without isolation: what per-key state (arrival rates) is kept under, so a
        job run alone adds no state of its own."""
        return self if self.alone is None else BatchKey(self.queue, self.compat)


@dataclass(frozen=True)
class ImageWork:
    """One image of a batch: what differs between neighbours."""

    prompt: str
    negative_prompt: str | None
    seed: int


#: Called by the model at every step boundary with (step, total steps); returning True
#: stops the call there (cancel). Later: the point where new images join a running batch.
StepCallback = Callable[[int, int], bool]


class Model(Protocol):
    """A model backend, driven only from the engine's one thread."""

    name: str

    def run(
        self, key: CompatKey, images: list[ImageWork], on_step: StepCallback | None = None
    ) -> npt.NDArray[np.uint8]:
        """One call for all ``images``: a ``(n, height, width, 3)`` uint8 array."""
        ...

    def warm(self, shape: WarmShape) -> None: ...

    def weight_bytes(self) -> int:
        """The bytes its weights take on the device: what a memory budget counts."""
        ...

    def release(self) -> None:
        """Give the device memory back: the engine evicts this model."""
        ...

    def memory_stats(self) -> tuple[int, int, int] | None:
        """Device bytes (allocated, reserved, peak since the last read); None where the
        device does not report them."""
        ...
