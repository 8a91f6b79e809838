"""The digits model: its data split, its images read back as digits, and ``fleet model
train digits`` writing a reproducible diffusers directory the worker's model code serves."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from sklearn.datasets import load_digits

from fleet.processes import BIN
from tests.quality.conftest import QUICK_STEPS
from workers.digits import build_pipeline, real_images
from workers.digits_data import DIGIT_MAX, JUDGE, SHIPPED, SIDE, TRAIN, prompt, split, to_digits
from workers.pipeline import DiffusersModel
from workers.protocol import EngineConfig
from workers.work import CompatKey, ImageWork


def test_the_split_is_fixed_disjoint_and_covers_every_digit():
    parts, again = split(), split()
    assert [len(parts[name].labels) for name in ("generator", "judge", "held_out")] == [
        TRAIN,
        JUDGE,
        1797 - TRAIN - JUDGE,
    ]
    for name, part in parts.items():
        assert np.array_equal(part.images, again[name].images) and set(part.labels) == set(range(10)), name
    whole = np.concatenate([part.images for part in parts.values()]).reshape(1797, -1)
    original = load_digits().images.reshape(1797, -1).astype(np.float32)
    assert sorted(map(bytes, whole)) == sorted(map(bytes, original))  # each image in exactly one part


def test_a_real_digit_drawn_as_an_image_reads_back_as_itself():
    digits = split()["held_out"].images
    images = real_images(digits)
    assert images.shape == (len(digits), SIDE, SIDE, 3) and images.dtype == np.uint8
    assert np.abs(to_digits(images) - digits).max() <= DIGIT_MAX / 255  # 8-bit rounding only


def test_the_trained_model_is_a_diffusers_directory_the_worker_serves(quick_digits):
    model = DiffusersModel.load(EngineConfig.one(str(quick_digits), device="cpu"))
    work = [ImageWork(prompt(7), None, 1), ImageWork(prompt(3), None, 2)]
    key = CompatKey(model.name, SIDE, SIDE, 3, 3.0, "UniPCMultistepScheduler")
    images = model.run(key, work)
    assert images.shape == (2, SIDE, SIDE, 3)
    assert np.array_equal(images, model.run(key, work))


@pytest.mark.e2e
def test_training_again_gives_the_same_weights(quick_digits, tmp_path):
    """The same plan and seed give the same bytes (on the same machine)."""
    subprocess.run([str(BIN / "fleet"), "model", "train", "digits", str(tmp_path), *QUICK_STEPS], check=True)
    for part in ("unet", "vae", "text_encoder"):
        ours, theirs = (next((d / part).glob("*.safetensors")).read_bytes() for d in (quick_digits, tmp_path))
        assert ours == theirs, part
    kept = subprocess.run(
        [str(BIN / "fleet"), "model", "train", "digits", str(tmp_path)], capture_output=True, text=True
    )
    assert kept.returncode == 0 and "kept existing model" in kept.stdout


def test_the_shipped_model_is_the_one_this_code_trains():
    """models/digits: the architecture ``build_pipeline`` makes (so the code that trains it
    is the code here), loadable by the worker, and small enough to ship (under 8 MB)."""
    shipped = build_pipeline()
    for part in ("unet", "vae", "text_encoder"):
        config = json.loads((SHIPPED / part / "config.json").read_text())
        expected = getattr(shipped, part).config
        expected = expected.to_dict() if hasattr(expected, "to_dict") else dict(expected)
        for name in ("block_out_channels", "layers_per_block", "latent_channels", "hidden_size", "num_hidden_layers"):
            assert config.get(name) == (list(v) if isinstance(v := expected.get(name), tuple) else v), (part, name)
    assert sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file()) < 8 * 2**20
    model = DiffusersModel.load(EngineConfig.one(str(SHIPPED), device="cpu"))
    assert model.run(CompatKey(model.name, SIDE, SIDE, 2, 3.0), [ImageWork(prompt(1), None, 0)]).shape == (
        1,
        SIDE,
        SIDE,
        3,
    )
