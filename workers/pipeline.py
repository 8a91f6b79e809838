"""Loading a diffusers pipeline and running one batch of compatible images through it.

Everything here runs in the engine (``workers.engine``), on its one thread: torch called
from two threads runs about 2x slower, and torch used before a fork hangs the child.

Compiled mode (``FLEET_COMPILE``) compiles the UNet with ``torch.compile`` (CUDA graphs
with ``reduce-overhead``) in channels-last, once per warmed shape during warm-up, with
static shapes. A batch size that was not warmed is padded up to the next warmed size of
its shape (the padding images are computed and dropped: a batch of 5 costs what a batch of
8 does) rather than recompiled, which would stall the engine for a minute or more; a batch
larger than every warmed size compiles anew once (logged). Eager mode needs no padding.

LoRA adapters (``CompatKey.loras``) are loaded with diffusers' ``load_lora_weights`` the
first time a batch names them and kept; between batches only ``set_adapters`` (or
``disable_lora`` for a batch with none) changes, so switching never reloads the base model.
An adapter that fails to load fails its batch with ``PipelineError`` and is removed again;
the model and the engine carry on.
"""

from __future__ import annotations

import bisect
import gc
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline

from tasks.errors import DeviceLost, FleetError, ModelOutOfMemory, PipelineError
from tasks.schedulers import SCHEDULERS
from tasks.settings import BatchingMode, WarmShape
from workers.denoise import Denoiser, SlotBatch, not_covered
from workers.protocol import EngineConfig
from workers.quantize import module_bytes, quantize_module
from workers.work import CompatKey, Images, ImageWork, Slots, StepCallback, Stepper

log = logging.getLogger(__name__)

#: A loaded diffusers pipeline. Its components (``unet``, ``vae``...) are attributes that
#: ``register_modules`` sets at run time and its ``__call__`` is each subclass's own, so to
#: a type checker a pipeline is ``Any`` past ``from_pretrained``.
Pipeline = Any

#: Enough steps that CUDA graphs are recorded and replayed once during warm-up.
WARM_STEPS = 3


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
    return torch.float16 if device.startswith("cuda") else torch.float32


def load_pipeline(model_ref: str, device: str, dtype: torch.dtype) -> Pipeline:
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


def compile_unet(pipe: Pipeline, mode: str) -> None:
    """``torch.compile`` the UNet in channels-last. Its artefacts go to the cache the
    engine's environment names (``EngineConfig.environment``), so a restarted or
    scaled-out worker reuses them."""
    import torch._dynamo

    # One graph per warmed shape: let the compiler keep more than its default 8.
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.unet = torch.compile(pipe.unet, mode=None if mode == "default" else mode, fullgraph=True, dynamic=False)


class DiffusersModel:
    """A loaded pipeline on its device: the engine's one handle on torch."""

    def __init__(
        self,
        pipe: Pipeline,
        device: str,
        name: str,
        compiled: bool = False,
        loras: tuple[tuple[str, str], ...] = (),
    ):
        self.pipe = pipe
        self.device = device
        self.name = name
        self.compiled = compiled
        self._warmed: dict[tuple[int, int], list[int]] = {}  # (width, height) -> batch sizes
        self._schedulers: dict[str | None, Any] = {None: pipe.scheduler}
        self._denoisers: dict[str | None, Denoiser] = {}
        self._lora_paths = dict(loras)
        self._adapters: set[str] = set()  # loaded into the pipeline
        self._active: tuple[tuple[str, float], ...] | None = ()  # None: unknown (after a load)

    @classmethod
    def load(cls, config: EngineConfig) -> DiffusersModel:
        """The config's (first) model on its device."""
        spec = config.model
        device = select_device(config.device)
        pipe = load_pipeline(spec.ref, device, select_dtype(device, spec.dtype))
        if spec.quantize == "int8":
            before = module_bytes(pipe.unet)
            layers = quantize_module(pipe.unet)
            log.info("UNet weights in int8: %d layers, %d -> %d bytes", layers, before, module_bytes(pipe.unet))
        compiled = config.compile != "off"
        if compiled:
            compile_unet(pipe, config.compile)
        log.info("loaded %s on %s%s", spec.ref, device, f", UNet compiled ({config.compile})" * compiled)
        return cls(pipe, device, spec.ref, compiled, spec.loras)

    def run(self, key: CompatKey, images: list[ImageWork], on_step: StepCallback | None = None) -> np.ndarray:
        padded = self._padded(key, images)
        if len(padded) > len(images):
            log.debug("padding a batch of %d to the warmed size %d", len(images), len(padded))
        elif self.compiled and (key.width, key.height) in self._warmed and len(images) not in self._warm_sizes(key):
            log.warning("batch of %d at %dx%d was not warmed: compiling it now", len(images), key.width, key.height)
        self.pipe.scheduler = self._scheduler(key.scheduler)
        self._use_adapters(key.loras)
        return generate(self.pipe, key, padded, self.device, on_step)[: len(images)]

    @property
    def batching(self) -> BatchingMode:
        """Step-level on a GPU running eagerly, where the loop covers the pipeline: there a
        step of a few images costs about what one image's does (DESIGN.md "Measured on a
        GPU"). Not on a CPU (compute-bound: each image adds its share to every step, and
        step-level batches measured no reliable win, BENCHMARKS.md §13), nor compiled."""
        eager_gpu = self.device.startswith("cuda") and not self.compiled
        return "step" if eager_gpu and not_covered(self.pipe) is None else "request"

    def stepper(self, key: CompatKey) -> Stepper | None:
        """The engine's own denoising loop (``workers.denoise``) with ``key``'s scheduler
        and adapters. None in compiled mode: its CUDA graphs are recorded for fixed batch
        sizes, and a step-level batch changes size at every boundary (such batches run as
        calls); and for a UNet the loop does not cover (LCM's guidance embedding)."""
        if self.compiled:
            return None
        self._use_adapters(key.loras)
        scheduler = self._scheduler(key.scheduler)
        if key.scheduler not in self._denoisers:
            try:
                self._denoisers[key.scheduler] = Denoiser(self.pipe, self.device, scheduler)
            except NotImplementedError as exc:
                log.warning("no step-level batching for %s: %s", self.name, exc)
                return None
        return GuardedStepper(self._denoisers[key.scheduler])

    def _use_adapters(self, loras: tuple[tuple[str, float], ...]) -> None:
        """Make ``loras`` (name, scale) the active adapters: load those never loaded, then
        ``set_adapters``; none: ``disable_lora``. Nothing changes when the last batch had
        the same ones."""
        if loras == self._active:
            return
        for name, _ in loras:
            if name not in self._adapters:
                self._load_adapter(name)
        self._active = None
        if loras:
            self.pipe.enable_lora()
            self.pipe.set_adapters([name for name, _ in loras], adapter_weights=[scale for _, scale in loras])
        elif self._adapters:
            self.pipe.disable_lora()
        self._active = loras

    def _load_adapter(self, name: str) -> None:
        path = self._lora_paths.get(name)
        if path is None:
            raise PipelineError(f"model {self.name} has no LoRA adapter {name!r}")
        where = Path(path)
        directory, weight_name = (where.parent, where.name) if where.is_file() else (where, None)
        self._active = None  # a loaded adapter is active until set_adapters says otherwise
        try:
            self.pipe.load_lora_weights(
                str(directory), weight_name=weight_name, adapter_name=name, local_files_only=True
            )
        except Exception as exc:
            self._forget_adapter(name)
            error = f"{type(exc).__name__}: {exc}"
            raise PipelineError(f"LoRA adapter {name!r} could not be loaded from {path}: {error}") from exc
        self._adapters.add(name)
        log.info("LoRA adapter %s loaded from %s", name, path)

    def _forget_adapter(self, name: str) -> None:
        """Take a half-loaded adapter out again, so the next batch runs on a clean model."""
        try:
            if any(name in names for names in self.pipe.get_list_adapters().values()):
                self.pipe.delete_adapters(name)
        except Exception:
            log.exception("could not remove the adapter %s that failed to load", name)

    def weight_bytes(self) -> int:
        """The bytes of every module of the pipeline: what a memory budget counts."""
        return sum(module_bytes(part) for part in self.pipe.components.values() if isinstance(part, torch.nn.Module))

    def release(self) -> None:
        """Drop the pipeline and hand its device memory back (the engine evicts it)."""
        self.pipe = None
        self._schedulers.clear()
        self._denoisers.clear()
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def _scheduler(self, name: str | None) -> Any:
        """The scheduler a batch asked for, made once from the model's own config (its noise
        schedule and prediction type) and kept; None: the model's own."""
        if name not in self._schedulers:
            if name not in SCHEDULERS:
                raise PipelineError(f"unknown scheduler {name!r}")
            import diffusers

            self._schedulers[name] = getattr(diffusers, name).from_config(self._schedulers[None].config)
        return self._schedulers[name]

    def memory_stats(self) -> tuple[int, int, int] | None:
        """CUDA: bytes allocated and reserved now, and the peak allocated since the last
        read (the call that just ran); None on other devices."""
        if not self.device.startswith("cuda"):
            return None
        stats = (torch.cuda.memory_allocated(), torch.cuda.memory_reserved(), torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
        return stats

    def warm(self, shape: WarmShape) -> None:
        """Run each batch size once (compiling it, in compiled mode), so no served shape
        pays for initialisation in a client's first request."""
        key = CompatKey(self.name, shape.width, shape.height, steps=WARM_STEPS, guidance_scale=7.5)
        for size in shape.batch_sizes:
            started = time.perf_counter()
            generate(self.pipe, key, [ImageWork("warm-up", None, i) for i in range(size)], self.device)
            bisect.insort(self._warm_sizes(key), size)
            log.info(
                "warmed %dx%d at batch %d in %.1fs", shape.width, shape.height, size, time.perf_counter() - started
            )

    def _warm_sizes(self, key: CompatKey) -> list[int]:
        return self._warmed.setdefault((key.width, key.height), [])

    def _padded(self, key: CompatKey, images: list[ImageWork]) -> list[ImageWork]:
        """Compiled mode: pad up to the next warmed batch size of this shape, if any."""
        sizes = self._warmed.get((key.width, key.height)) if self.compiled else None
        if not sizes:
            return images
        index = bisect.bisect_left(sizes, len(images))
        if index == len(sizes):
            return images
        return images + [images[-1]] * (sizes[index] - len(images))


def generate(
    pipe: Pipeline,
    key: CompatKey,
    images: list[ImageWork],
    device: str,
    on_step: StepCallback | None = None,
) -> np.ndarray:
    """One pipeline call for all ``images``, each with its own seeded generator: a
    ``(n, height, width, 3)`` uint8 array, rounded exactly as diffusers' PIL output is."""
    generator_device = "cpu" if device == "mps" else device
    generators = [torch.Generator(device=generator_device).manual_seed(w.seed) for w in images]

    def step_end(pipeline, step: int, timestep, callback_kwargs: dict) -> dict:
        if on_step is not None and on_step(step + 1, key.steps):
            pipeline._interrupt = True  # diffusers skips the remaining steps
        return callback_kwargs

    with model_errors(len(images)), torch.inference_mode():
        out = pipe(
            prompt=[w.prompt for w in images],
            negative_prompt=[w.negative_prompt or "" for w in images],
            width=key.width,
            height=key.height,
            num_inference_steps=key.steps,
            guidance_scale=key.guidance_scale,
            generator=generators,
            output_type="pt",
            callback_on_step_end=step_end if on_step is not None else None,
            callback_on_step_end_tensor_inputs=[],
        )
        # (x * 255).round() in float32, as diffusers' numpy_to_pil does: the same bytes.
        pixels = (out.images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        return pixels.contiguous().cpu().numpy()


@contextmanager
def model_errors(images: int) -> Iterator[None]:
    """What the engine makes of an exception in a model call: out of memory, a lost device
    (the engine must be replaced), or a failed call (``PipelineError``)."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        raise ModelOutOfMemory(f"out of device memory at {images} images: {exc}") from exc
    except FleetError:
        raise
    except Exception as exc:
        if _device_lost(exc):
            raise DeviceLost(f"{type(exc).__name__}: {exc}") from exc
        raise PipelineError(f"the pipeline failed: {type(exc).__name__}: {exc}") from exc


class GuardedStepper:
    """A ``Denoiser`` whose errors are the engine's (``model_errors``)."""

    def __init__(self, denoiser: Denoiser):
        self._denoiser = denoiser

    def admit(self, batches: Sequence[tuple[CompatKey, list[ImageWork]]]) -> list[Slots]:
        with model_errors(sum(len(images) for _, images in batches)):
            return list(self._denoiser.admit(batches))

    def step(self, running: Sequence[Slots]) -> None:
        with model_errors(_images(running)):
            self._denoiser.step(running)

    def decode(self, finished: Sequence[Slots]) -> list[Images]:
        with model_errors(_images(finished)):
            return self._denoiser.decode(finished)


def _images(batches: Sequence[Slots]) -> int:
    return sum(len(batch.slots) for batch in batches if isinstance(batch, SlotBatch))


def _device_lost(exc: Exception) -> bool:
    """A CUDA error (illegal address, device-side assert, ...) poisons the process's
    context: every later call fails too, so the engine must be replaced."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("CUDA error" in text or "device-side assert" in text)
