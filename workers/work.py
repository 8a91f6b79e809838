"""What the model is asked to do: plain types, no torch, shared by the worker process, the
engine process and every model backend."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeAlias

import numpy as np
import numpy.typing as npt

from tasks.settings import BatchingMode, WarmShape


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

    def joins(self, other: CompatKey) -> bool:
        """Whether images of ``other`` may share a UNet call with these at a step boundary
        (step-level batching): the same model, size, scheduler and adapters; steps and
        guidance may differ, each slot keeping its own."""
        return (self.model, self.width, self.height, self.scheduler, self.loras) == (
            other.model, other.width, other.height, other.scheduler, other.loras
        )  # fmt: skip


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
#: stops the call there (cancel).
StepCallback = Callable[[int, int], bool]

#: A batch of images: ``(n, height, width, 3)`` uint8.
Images: TypeAlias = npt.NDArray[np.uint8]


class Slots(Protocol):
    """One batch's images in a model's step-level loop (``Stepper``): each batch keeps its
    own step count, so batches admitted at different steps run side by side."""

    @property
    def step_index(self) -> int:
        """Steps run so far."""
        ...

    @property
    def steps(self) -> int: ...

    @property
    def done(self) -> bool: ...


class Stepper(Protocol):
    """A model's denoising loop, run one step at a time (step-level batching): batches are
    admitted at step boundaries and leave as soon as their own steps are done."""

    def admit(self, batches: Sequence[tuple[CompatKey, list[ImageWork]]]) -> list[Slots]:
        """Slots for each batch (its key, its images), admitted at one step boundary:
        prompts encoded, latents drawn, nothing stepped yet."""
        ...

    def step(self, running: Sequence[Slots]) -> None:
        """One model call for every slot of ``running``, each at its own step."""
        ...

    def decode(self, finished: Sequence[Slots]) -> list[Images]:
        """The images of batches that finished at one step boundary (they share a size):
        ``(n, height, width, 3)`` uint8 each."""
        ...


class Model(Protocol):
    """A model backend, driven only from the engine's one thread."""

    name: str

    @property
    def batching(self) -> BatchingMode:
        """The batching ``FLEET_BATCHING=auto`` runs this model's batches with: "step" where
        a step of a few images costs about what one image's does (an eager pipeline on a
        GPU: launch-bound), so that a job joining the running ones costs them little;
        "request" where each image adds its share (a CPU), or the model has no step loop."""
        ...

    def run(
        self, key: CompatKey, images: list[ImageWork], on_step: StepCallback | None = None
    ) -> npt.NDArray[np.uint8]:
        """One call for all ``images``: a ``(n, height, width, 3)`` uint8 array."""
        ...

    def stepper(self, key: CompatKey) -> Stepper | None:
        """The model's step-level loop, set up for batches that join ``key`` (its scheduler
        and adapters); None where it has none for them: such batches run as calls."""
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
