"""The denoising loop of a Stable Diffusion pipeline, owned by the engine, one image a slot.

A diffusers pipeline call runs a whole batch from its first step to its last: an image
that arrives meanwhile waits for the next call. Here each image is a ``Slot`` with its own
latents (drawn from its own seeded generator, as the pipeline draws them), its own copy of
the scheduler (its own steps, its own state), its own prompt embeddings and guidance; one
``step`` runs the UNet once for every slot, each at its own timestep, and steps each slot's
scheduler. So slots may join and leave a running batch at any step boundary (issue 26:
step-level batching), and ``run`` (every slot admitted at once, stepped to the end) draws
the pipeline's images: the same arithmetic in the same order, per image, to within the
batch-invariance of the device's kernels (docs/DESIGN.md).

What it replicates of ``StableDiffusionPipeline.__call__`` (diffusers 0.42): ``encode_prompt``
with classifier-free guidance when the scale is above 1, ``prepare_latents``' draw per image,
``scale_model_input`` and ``step`` with ``eta`` 0 and the image's generator where the
scheduler takes them, guidance ``uncond + g * (text - uncond)``, and the autoencoder's decode
and postprocessing. Pipelines it does not cover (another family's, such as SDXL's with its
second text encoder and added conditions; a UNet with a guidance embedding, LCM's
``time_cond_proj_dim``) are refused (``not_covered``): the pipeline call runs them.
"""

from __future__ import annotations

import copy
import inspect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from workers.work import CompatKey, Images, ImageWork, Slots, StepCallback


@dataclass(eq=False)
class Slot:
    """One image of the running batch."""

    work: ImageWork
    guidance_scale: float
    scheduler: Any  # its own instance, its timesteps set for its own steps
    generator: torch.Generator
    latents: torch.Tensor  # (1, channels, h, w)
    text: torch.Tensor  # (1, tokens, width): the prompt's embedding
    negative: torch.Tensor | None  # the negative prompt's, when guided
    step_index: int = 0  # the next step to run

    @property
    def guided(self) -> bool:
        return self.negative is not None

    @property
    def steps(self) -> int:
        return len(self.scheduler.timesteps)

    @property
    def done(self) -> bool:
        return self.step_index >= self.steps

    @property
    def timestep(self) -> torch.Tensor:
        return self.scheduler.timesteps[self.step_index]


@dataclass(eq=False)
class SlotBatch:
    """The slots of one batch (one recipe): they step together, so they share a count."""

    slots: list[Slot]

    @property
    def step_index(self) -> int:
        return self.slots[0].step_index

    @property
    def steps(self) -> int:
        return self.slots[0].steps

    @property
    def done(self) -> bool:
        return self.slots[0].done


def _slots(batch: Slots) -> list[Slot]:
    if not isinstance(batch, SlotBatch):
        raise TypeError(f"a Denoiser steps its own slots, not {type(batch).__name__}")
    return batch.slots


def not_covered(pipe: Any) -> str | None:
    """Why the loop cannot run ``pipe``'s images; None where it can."""
    if not isinstance(pipe, StableDiffusionPipeline):
        return f"{type(pipe).__name__} is not a StableDiffusionPipeline"
    if getattr(cast(Any, pipe).unet.config, "time_cond_proj_dim", None) is not None:
        return "a UNet with a guidance embedding (LCM)"
    return None


class Denoiser:
    """Slots of one pipeline (its UNet, scheduler, text encoder and autoencoder): the
    ``Stepper`` of a diffusers model."""

    def __init__(self, pipe: Any, device: str, scheduler: Any | None = None):
        reason = not_covered(pipe)
        if reason is not None:
            raise NotImplementedError(f"{reason}: run it through the pipeline")
        self.pipe = pipe
        self.device = device
        self.scheduler = scheduler if scheduler is not None else pipe.scheduler
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        self._eta = "eta" in accepted
        self._generator = "generator" in accepted

    @torch.inference_mode()
    def admit(self, batches: Sequence[tuple[CompatKey, list[ImageWork]]]) -> list[SlotBatch]:
        """New slots for each batch (its key, its images): the prompts of every guided batch
        encoded in one call and those of every unguided one in another, latents drawn from
        each image's own generator, a scheduler each."""
        pipe = self.pipe
        encoded: dict[bool, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for guided in {key.guidance_scale > 1 for key, _ in batches}:
            images = [w for key, work in batches if (key.guidance_scale > 1) == guided for w in work]
            encoded[guided] = pipe.encode_prompt(
                [w.prompt for w in images], self.device, 1, guided, [w.negative_prompt or "" for w in images]
            )
        generator_device = "cpu" if self.device == "mps" else self.device
        factor = pipe.vae_scale_factor
        rows = dict.fromkeys(encoded, 0)  # the next row of each encoding
        admitted = []
        for key, work in batches:
            guided = key.guidance_scale > 1
            text, negative = encoded[guided]
            shape = (1, pipe.unet.config.in_channels, key.height // factor, key.width // factor)
            slots = []
            for image in work:
                row, rows[guided] = rows[guided], rows[guided] + 1
                generator = torch.Generator(device=generator_device).manual_seed(image.seed)
                scheduler = copy.deepcopy(self.scheduler)
                scheduler.set_timesteps(key.steps, device=self.device)
                latents = randn_tensor(shape, generator=[generator], device=torch.device(self.device), dtype=text.dtype)
                latents = latents * scheduler.init_noise_sigma
                unconditional = negative[row : row + 1] if guided and negative is not None else None
                slots.append(
                    Slot(image, key.guidance_scale, scheduler, generator, latents, text[row : row + 1], unconditional)
                )
            admitted.append(SlotBatch(slots))
        return admitted

    @torch.inference_mode()
    def step(self, running: Sequence[Slots]) -> None:
        """One UNet call for every slot, each at its own timestep; then each slot's
        scheduler steps its latents. Rows: the guided slots' unconditional ones, then every
        slot's conditional one."""
        slots = [slot for batch in running for slot in _slots(batch)]
        guided = [s for s in slots if s.guided]
        rows = [*(("negative", s) for s in guided), *(("text", s) for s in slots)]
        inputs = {id(s): s.scheduler.scale_model_input(torch.cat([s.latents] * (2 if s.guided else 1)), s.timestep)
                  for s in slots}  # fmt: skip
        sample = torch.cat([inputs[id(s)][0:1] if kind == "negative" else inputs[id(s)][-1:] for kind, s in rows])
        embeddings = torch.cat([s.negative if kind == "negative" else s.text for kind, s in rows])  # type: ignore[misc]
        timesteps = torch.stack([s.timestep for _, s in rows]).to(self.device)
        noise = self.pipe.unet(sample, timesteps, encoder_hidden_states=embeddings, return_dict=False)[0]
        unconditional = {id(s): noise[i : i + 1] for i, s in enumerate(guided)}
        for offset, slot in enumerate(slots):
            prediction = noise[len(guided) + offset : len(guided) + offset + 1]
            if slot.guided:
                base = unconditional[id(slot)]
                prediction = base + slot.guidance_scale * (prediction - base)
            extra: dict[str, Any] = {}
            if self._eta:
                extra["eta"] = 0.0
            if self._generator:
                extra["generator"] = slot.generator
            slot.latents = slot.scheduler.step(prediction, slot.timestep, slot.latents, **extra, return_dict=False)[0]
            slot.step_index += 1

    @torch.inference_mode()
    def decode(self, finished: Sequence[Slots]) -> list[Images]:
        """The finished batches' images, in one autoencoder call (they share a size): a
        ``(n, height, width, 3)`` uint8 array each, rounded as diffusers' PIL output is."""
        slots = [slot for batch in finished for slot in _slots(batch)]
        vae = self.pipe.vae
        latents = torch.cat([s.latents for s in slots])
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        image = self.pipe.image_processor.postprocess(image, output_type="pt", do_denormalize=[True] * len(slots))
        pixels = (image.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
        bounds = np.cumsum([0, *(len(_slots(batch)) for batch in finished)])
        return [pixels[start:end] for start, end in itertools.pairwise(bounds)]

    def run(self, key: CompatKey, images: list[ImageWork], on_step: StepCallback | None = None) -> Images:
        """Every image admitted at once and stepped to the end: a request-level batch on
        the engine's own loop. ``on_step`` as the pipeline's (True stops early)."""
        (batch,) = self.admit([(key, images)])
        while not batch.done:
            self.step([batch])
            if on_step is not None and on_step(batch.step_index, batch.steps):
                break
        return self.decode([batch])[0]
