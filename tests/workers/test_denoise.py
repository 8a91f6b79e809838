"""The engine's own denoising loop against the diffusers pipeline call: the same images
for the same seeds and recipe, to within one level per channel (CPU kernels are not
batch-invariant: docs/DESIGN.md), for every scheduler, with and without guidance; and
slots at different steps in one UNet call."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.schedulers import SCHEDULERS
from workers.denoise import Denoiser, not_covered
from workers.pipeline import DiffusersModel, generate
from workers.protocol import EngineConfig
from workers.work import CompatKey, ImageWork

WORK = [ImageWork("a red fox", None, 3), ImageWork("a lighthouse", "fog", 11), ImageWork("a cat", None, 12)]


@pytest.fixture(scope="module")
def model(tiny_model) -> DiffusersModel:
    return DiffusersModel.load(EngineConfig.one(str(tiny_model), device="cpu"))


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) <= 1


@pytest.mark.parametrize(("scheduler", "guidance"), [(None, 7.5), (None, 1.0), *((name, 7.5) for name in SCHEDULERS)])
def test_the_loop_draws_the_pipeline_s_images(model, scheduler, guidance):
    key = CompatKey(model.name, 64, 64, 4, guidance, scheduler)
    model.pipe.scheduler = model._scheduler(scheduler)
    expected = generate(model.pipe, key, WORK, "cpu")
    drawn = Denoiser(model.pipe, "cpu").run(key, WORK)
    assert drawn.shape == expected.shape and close(drawn, expected), scheduler


def test_slots_at_different_steps_share_a_call_and_each_ends_as_it_would_alone(model):
    """A slot admitted two steps after the others, with its own steps and guidance, ends
    with the image it draws alone, and so do they."""
    model.pipe.scheduler = model._scheduler(None)
    denoiser = Denoiser(model.pipe, "cpu")
    early_key, late_key = CompatKey(model.name, 64, 64, 6, 7.5), CompatKey(model.name, 64, 64, 4, 3.0)
    alone = {
        "early": denoiser.run(early_key, WORK[:2]),
        "late": denoiser.run(late_key, WORK[2:]),
    }
    (early,) = denoiser.admit([(early_key, WORK[:2])])
    denoiser.step([early])
    denoiser.step([early])
    (late,) = denoiser.admit([(late_key, WORK[2:])])
    running = [early, late]
    while running:
        denoiser.step(running)
        running = [batch for batch in running if not batch.done]
    assert [s.step_index for s in early.slots + late.slots] == [6, 6, 4]
    assert close(denoiser.decode([early])[0], alone["early"]) and close(denoiser.decode([late])[0], alone["late"])


class Joined:
    """``model``, whose step-level loop puts ``later`` in the engine's inbox after its
    second step: a batch arriving while others run."""

    def __init__(self, model, inbox, later):
        self._model, self._inbox, self._later, self._steps = model, inbox, later, 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def stepper(self, key):
        self._stepper = self._model.stepper(key)
        return self

    def admit(self, batches):
        return self._stepper.admit(batches)

    def decode(self, finished):
        return self._stepper.decode(finished)

    def step(self, running):
        self._stepper.step(running)
        self._steps += 1
        if self._steps == 2:
            for message in self._later:
                self._inbox.queue.put(message)


def test_the_engine_s_step_level_batches_draw_the_request_level_images(model):
    """Through the engine: a batch that joins two steps into another, with other steps and
    guidance, and both get the images request-level calls give."""
    from workers.engine import EngineCore
    from workers.engine_client import _QueueInbox
    from workers.protocol import Done, Join, RunBatch, Step, Stop

    first = CompatKey(model.name, 64, 64, 5, 7.5, "EulerDiscreteScheduler")
    second = CompatKey(model.name, 64, 64, 3, 1.0, "EulerDiscreteScheduler")

    def engine(batches, later=None) -> list[object]:
        inbox, sent = _QueueInbox(), []
        for batch in batches:
            inbox.queue.put(batch)
        if later is None:
            inbox.queue.put(Stop())
        loaded = model if later is None else Joined(model, inbox, [later, Stop()])
        EngineCore(EngineConfig.one(model.name), inbox, sent.append, load=lambda config: loaded).run()
        return sent

    calls = engine([RunBatch(1, first, tuple(WORK[:2])), RunBatch(2, second, tuple(WORK[2:]))])
    late = RunBatch(2, second, tuple(WORK[2:]), join=Join(8))
    joined = engine([RunBatch(1, first, tuple(WORK[:2]), join=Join(8))], late)
    images = [{m.batch_id: m.images for m in sent if isinstance(m, Done)} for sent in (calls, joined)]
    assert close(images[1][1], images[0][1]) and close(images[1][2], images[0][2])
    steps = [(m.batch_id, m.step) for m in joined if isinstance(m, Step)]
    assert steps.index((2, 1)) == steps.index((1, 3)) + 1, "it joined at the boundary after step 2"


@pytest.mark.parametrize("scheduler", [None, "DPMSolverMultistepScheduler"])
def test_the_loop_draws_the_pipeline_s_images_in_half_precision(tiny_model, scheduler):
    """A GPU runs the model in float16 (``select_dtype``); bfloat16, which the CPU runs,
    takes the same paths through the loop: latents in the embeddings' dtype, and a
    scheduler that computes in float32 (DPM-Solver) and hands back half precision."""
    half = DiffusersModel.load(EngineConfig.one(str(tiny_model), device="cpu", dtype="bfloat16"))
    key = CompatKey(half.name, 64, 64, 4, 7.5, scheduler)
    half.pipe.scheduler = half._scheduler(scheduler)
    expected = generate(half.pipe, key, WORK, "cpu")
    assert half.pipe.unet.dtype == torch.bfloat16
    assert close(Denoiser(half.pipe, "cpu", half._scheduler(scheduler)).run(key, WORK), expected)


def test_auto_batching_is_step_level_for_an_eager_gpu_pipeline_the_loop_covers(model):
    """``Model.batching``, what FLEET_BATCHING=auto runs: read from the device, the
    compile mode and the pipeline's class (nothing here runs on the device)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    assert model.batching == "request", "a CPU is compute-bound"
    assert DiffusersModel(model.pipe, "cuda", model.name).batching == "step"
    assert DiffusersModel(model.pipe, "cuda:1", model.name, compiled=True).batching == "request"
    other = DiffusersModel(StableDiffusionImg2ImgPipeline(**model.pipe.components), "cuda", model.name)
    assert not_covered(other.pipe) == "StableDiffusionImg2ImgPipeline is not a StableDiffusionPipeline"
    assert other.batching == "request" and other.stepper(CompatKey(model.name, 64, 64, 4, 7.5)) is None
