"""A digits model trained for a few steps only: the whole path (training, the diffusers
directory, the worker's model code, the judge) without the minutes the real one takes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fleet.processes import BIN

#: optimizer steps per stage: enough to exercise every line of training, not to learn
QUICK_STEPS = ["--vae-steps", "2", "--unet-steps", "2"]


@pytest.fixture(scope="session")
def quick_digits(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("digits") / "model"
    subprocess.run([str(BIN / "fleet"), "model", "train", "digits", str(target), *QUICK_STEPS], check=True)
    return target


#: a distillation that exercises every line of it, not one that learns
QUICK_DISTILL = ["--trajectories", "16", "--train-steps", "2"]


@pytest.fixture(scope="session")
def quick_distilled(quick_digits, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("distilled") / "model"
    command = [str(BIN / "fleet"), "model", "distill", "digits", str(target), "--teacher", str(quick_digits)]
    subprocess.run([*command, *QUICK_DISTILL], check=True)
    return target
