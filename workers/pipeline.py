"""Loading a diffusers pipeline and running one batch of compatible images through it.

Everything here must run on the model thread (see ``workers.runner``): torch called
from two threads runs about 2x slower, and torch used before a fork hangs the child.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from tasks.errors import ModelOutOfMemory, PipelineError
from workers.work import CompatKey, ImageWork

log = logging.getLogger(__name__)


def select_device(preference: str = "auto") -> str:
    if preference != "auto":
        return preference
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def select_dtype(device: str, preference: str = "auto") -> torch.dtype:
    if preference != "auto":
        return getattr(torch, preference)
    return torch.float16 if device == "cuda" else torch.float32


def load_pipeline(model_ref: str, device: str, dtype: torch.dtype) -> DiffusionPipeline:
    """Load a model directory or, if configured, a hub id. Never downloads a local path."""
    path = Path(model_ref)
    is_local = path.exists() or model_ref.startswith((".", "/", "~"))
    if is_local and not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"no diffusers model at '{model_ref}': run `fleet model init {model_ref}` to write the "
            "tiny local model, or set FLEET_MODEL to a model directory or hub id"
        )
    pipe = DiffusionPipeline.from_pretrained(model_ref, dtype=dtype, local_files_only=is_local)
    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class DiffusersModel:
    """A loaded pipeline on its device: the model thread's one handle on torch."""

    def __init__(self, pipe: DiffusionPipeline, device: str, name: str):
        self.pipe = pipe
        self.device = device
        self.name = name

    @classmethod
    def load(cls, model_ref: str, device_preference: str = "auto", dtype_preference: str = "auto") -> DiffusersModel:
        device = select_device(device_preference)
        pipe = load_pipeline(model_ref, device, select_dtype(device, dtype_preference))
        log.info("loaded %s on %s", model_ref, device)
        return cls(pipe, device, model_ref)

    def run(self, key: CompatKey, images: list[ImageWork]) -> list[Image.Image]:
        return generate(self.pipe, key, images, self.device)

    def warm(self, width: int, height: int) -> None:
        """One short call so the first job does not pay for lazy initialisation."""
        self.run(CompatKey(self.name, width, height, steps=2, guidance_scale=7.5), [ImageWork("warm-up", None, 0)])


def generate(pipe: DiffusionPipeline, key: CompatKey, images: list[ImageWork], device: str) -> list[Image.Image]:
    """One pipeline call for all ``images``; each gets its own seeded generator."""
    generator_device = "cpu" if device == "mps" else device
    generators = [torch.Generator(device=generator_device).manual_seed(w.seed) for w in images]
    try:
        with torch.inference_mode():
            out = pipe(
                prompt=[w.prompt for w in images],
                negative_prompt=[w.negative_prompt or "" for w in images],
                width=key.width,
                height=key.height,
                num_inference_steps=key.steps,
                guidance_scale=key.guidance_scale,
                generator=generators,
                output_type="pil",
            )
    except torch.cuda.OutOfMemoryError as exc:
        raise ModelOutOfMemory(f"out of device memory at {len(images)} images: {exc}") from exc
    except Exception as exc:
        raise PipelineError(f"the pipeline failed: {type(exc).__name__}: {exc}") from exc
    return list(out.images)
