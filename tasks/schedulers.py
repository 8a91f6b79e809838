"""The samplers a request may choose (``scheduler``), by their diffusers class names: the
worker makes one with ``from_config`` of the model's own scheduler, so the noise schedule
the model was trained on is kept. Null: the model's own (its ``scheduler/`` directory)."""

from __future__ import annotations

from typing import Literal, get_args

SchedulerName = Literal[
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "PNDMScheduler",
]
SCHEDULERS: tuple[SchedulerName, ...] = get_args(SchedulerName)
