"""The engine's own denoising loop against the diffusers pipeline call: the same images
for the same seeds and recipe, to within one level per channel (CPU kernels are not
batch-invariant: docs/DESIGN.md), for every scheduler, with and without guidance; and
slots at different steps in one UNet call."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.schedulers import SCHEDULERS
from workers.denoise import Denoiser
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
    early = denoiser.admit(early_key, WORK[:2])
    denoiser.step(early)
    denoiser.step(early)
    late = denoiser.admit(late_key, WORK[2:])
    running = early + late
    while running:
        denoiser.step(running)
        running = [s for s in running if not s.done]
    assert [s.step_index for s in early + late] == [6, 6, 4]
    assert close(denoiser.decode(early), alone["early"]) and close(denoiser.decode(late), alone["late"])
