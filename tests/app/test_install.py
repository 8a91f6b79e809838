"""The API installs and imports without the model stack: `.[api]` names no torch,
diffusers, moto or matplotlib, and importing the app loads none of them."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import requires

from packaging.requirements import Requirement

HEAVY = {"torch", "diffusers", "transformers", "accelerate", "moto", "matplotlib", "numpy", "pillow"}


def requirements_of(extra: str) -> set[str]:
    """What installing the project with ``extra`` asks for directly (the base included)."""
    names = set()
    for line in requires("diffusion-fleet") or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": extra}):
            names.add(requirement.name.lower())
    return names


def test_the_api_extra_brings_no_model_stack():
    api = requirements_of("api")
    assert {"flask", "gunicorn", "celery"} <= api
    assert not api & HEAVY, f"the API image would carry {api & HEAVY}"
    assert {"torch", "diffusers"} <= requirements_of("worker")


def test_importing_the_api_loads_no_torch():
    code = (
        "import sys, app; app.create_app(); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'numpy', 'PIL', 'moto'}))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
