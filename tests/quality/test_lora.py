"""``fleet model lora digits``: adapters trained reproducibly, written as diffusers reads
them, and the shipped ones loading into the shipped model, every layer of them."""

from __future__ import annotations

import subprocess

import numpy as np
from safetensors.torch import load_file

from fleet.processes import BIN
from workers.digits_data import SHIPPED, SIDE, prompt
from workers.lora import TARGETS, WEIGHTS_NAME
from workers.pipeline import DiffusersModel
from workers.protocol import EngineConfig
from workers.work import CompatKey, ImageWork

SHIPPED_LORAS = SHIPPED.with_name("digits-loras")


def test_the_same_steps_train_the_same_adapter_bytes(tmp_path):
    """Two trainings of three steps from the fixed seed, through the command line."""
    for run in ("one", "two"):
        done = subprocess.run(
            [
                str(BIN / "fleet"),
                "model",
                "lora",
                "digits",
                str(tmp_path / run),
                "--adapter",
                "bold",
                "--train-steps",
                "3",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert "wrote the bold adapter" in done.stdout
    one, two = ((tmp_path / run / "bold" / WEIGHTS_NAME).read_bytes() for run in ("one", "two"))
    assert one == two


def test_the_shipped_adapters_load_whole_and_change_the_shipped_model_s_images():
    """Every LoRA layer the file holds is one the model builds (peft's keys, all of them
    loaded), and each adapter draws another image from the same seed than none."""
    from peft.tuners.lora import LoraLayer

    adapters = tuple((name, str(SHIPPED_LORAS / name)) for name in ("bold", "mirror"))
    model = DiffusersModel.load(EngineConfig.one(str(SHIPPED), device="cpu", loras=adapters))
    work = [ImageWork(prompt(7), None, 3)]
    images = {
        name: model.run(CompatKey("digits", SIDE, SIDE, 8, 3.0, loras=loras), work)[0]
        for name, loras in (("none", ()), ("bold", (("bold", 1.0),)), ("mirror", (("mirror", 1.0),)))
    }
    layers = {n for n, m in model.pipe.unet.named_modules() if isinstance(m, LoraLayer)}
    for name, _ in adapters:
        keys = load_file(str(SHIPPED_LORAS / name / WEIGHTS_NAME))
        targeted = {k.removeprefix("unet.").rsplit(".lora_", 1)[0] for k in keys}
        assert targeted <= layers and len(targeted) == len(layers), name
        assert {t.rsplit(".", 1)[-1] for t in targeted} <= {t.rsplit(".", 1)[-1] for t in TARGETS}
    assert not np.array_equal(images["none"], images["bold"])
    assert not np.array_equal(images["none"], images["mirror"])
