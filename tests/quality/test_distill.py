"""``fleet model distill digits``: the 4-step student, its DDIM steps joining the teacher's
kept latents exactly, written as a diffusers directory the worker serves, reproducibly."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from fleet.processes import BIN
from tests.quality.conftest import QUICK_DISTILL
from workers.digits_data import SHIPPED, SHIPPED_DISTILLED, SIDE, prompt
from workers.distill import STUDENT_STEPS, DDIMJoin, trailing_ddim
from workers.pipeline import DiffusersModel
from workers.protocol import EngineConfig
from workers.work import CompatKey, ImageWork


def test_the_student_s_four_steps_are_every_quarter_of_the_schedule_from_its_end():
    sampler = trailing_ddim(DDIMScheduler.from_pretrained(str(SHIPPED), subfolder="scheduler").config)
    sampler.set_timesteps(STUDENT_STEPS)
    assert sampler.timesteps.tolist() == [999, 749, 499, 249]


def test_the_target_noise_makes_diffusers_ddim_step_land_on_the_teacher_s_next_latent():
    """The closed form the student learns from is diffusers' own DDIM update, inverted."""
    config = DDIMScheduler.from_pretrained(str(SHIPPED), subfolder="scheduler").config
    join, sampler = DDIMJoin.of(trailing_ddim(config)), trailing_ddim(config)
    sampler.set_timesteps(STUDENT_STEPS)
    generator = torch.Generator().manual_seed(0)
    for k, t in enumerate(sampler.timesteps):
        x_t, x_next = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
        eps = join.noise_to(torch.tensor([k, k]), x_t, x_next)
        landed = sampler.step(eps, t, x_t).prev_sample
        assert torch.allclose(landed, x_next, atol=1e-4), int(t)


def test_the_distilled_model_is_a_diffusers_directory_the_worker_serves_in_four_steps(quick_distilled):
    scheduler = json.loads((quick_distilled / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["timestep_spacing"] == "trailing"
    assert "_name_or_path" not in json.loads((quick_distilled / "unet" / "config.json").read_text())
    model = DiffusersModel.load(EngineConfig.one(str(quick_distilled), device="cpu"))
    work = [ImageWork(prompt(7), None, 1), ImageWork(prompt(3), None, 2)]
    key = CompatKey(model.name, SIDE, SIDE, STUDENT_STEPS, 1.0)
    images = model.run(key, work)
    assert images.shape == (2, SIDE, SIDE, 3)
    assert np.array_equal(images, model.run(key, work))


@pytest.mark.e2e
def test_distilling_again_gives_the_same_weights(quick_digits, quick_distilled, tmp_path):
    command = [str(BIN / "fleet"), "model", "distill", "digits", str(tmp_path), "--teacher", str(quick_digits)]
    subprocess.run([*command, *QUICK_DISTILL], check=True)
    ours, theirs = (next((d / "unet").glob("*.safetensors")).read_bytes() for d in (quick_distilled, tmp_path))
    assert ours == theirs
    kept = subprocess.run(command, capture_output=True, text=True)
    assert kept.returncode == 0 and "kept existing model" in kept.stdout


def test_the_shipped_distilled_model_is_the_shipped_model_s_student():
    """models/digits-4step: the teacher's architecture, text encoder and autoencoder with a
    UNet of its own, and the student's scheduler; small enough to ship."""
    for part in ("unet", "vae", "text_encoder"):
        assert json.loads((SHIPPED_DISTILLED / part / "config.json").read_text()) == json.loads(
            (SHIPPED / part / "config.json").read_text()
        ), part
    for part in ("vae", "text_encoder"):
        ours, teachers = (next((d / part).glob("*.safetensors")).read_bytes() for d in (SHIPPED_DISTILLED, SHIPPED))
        assert ours == teachers, part
    unet = [next((d / "unet").glob("*.safetensors")).read_bytes() for d in (SHIPPED_DISTILLED, SHIPPED)]
    assert unet[0] != unet[1]
    scheduler = json.loads((SHIPPED_DISTILLED / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["timestep_spacing"] == "trailing"
    for config in [*SHIPPED.rglob("*.json"), *SHIPPED_DISTILLED.rglob("*.json")]:
        assert "_name_or_path" not in json.loads(config.read_text()), config  # where it was made
    assert sum(f.stat().st_size for f in SHIPPED_DISTILLED.rglob("*") if f.is_file()) < 8 * 2**20
