"""A simulated model backend: it sleeps for as long as a real model would, and draws
small valid PNGs instead of computing them.

``FLEET_MODEL=sim:a=0.109,b=0.23,noise=0.05`` makes every call take
``(a * images + b) * (1 + noise * N(0, 1))`` seconds: the batch-cost profile of a real
model (fitted from the bare benchmark, or from published figures), so the fleet's own
overhead, scale-out over many workers and batching policies can be measured on a CPU-only
machine, or planned for a GPU not yet bought. ``sim:profile=NAME`` takes ``a`` and ``b``
from a shipped profile (``workers/profiles/NAME.json``).

Sleeping releases the GIL and uses no cores, like a GPU kernel. For fault tests, a prompt
containing ``[[raise]]`` makes the call raise, and ``[[crash]]`` ends the worker process
at once, as a driver fault would.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from workers.work import CompatKey, ImageWork

PROFILES = Path(__file__).parent / "profiles"
RAISE_MARK = "[[raise]]"
CRASH_MARK = "[[crash]]"


@dataclass(frozen=True)
class SimProfile:
    a: float  # seconds per image
    b: float  # seconds per call
    noise: float = 0.0  # relative standard deviation of a call's time

    def seconds(self, images: int, rng: random.Random) -> float:
        return max(0.0, (self.a * images + self.b) * (1 + self.noise * rng.gauss(0, 1)))

    @classmethod
    def parse(cls, spec: str) -> SimProfile:
        """``a=0.1,b=0.2,noise=0.05`` or ``profile=NAME[,noise=...]``."""
        fields: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"sim model: expected name=value, got '{part}'")
            fields[name.strip()] = value.strip()
        values: dict[str, float] = {}
        if "profile" in fields:
            data = json.loads((PROFILES / f"{fields.pop('profile')}.json").read_text())
            values.update(a=data["a"], b=data["b"])
        unknown = set(fields) - {"a", "b", "noise"}
        if unknown:
            raise ValueError(f"sim model: unknown field(s) {sorted(unknown)}")
        values.update({k: float(v) for k, v in fields.items()})
        if "a" not in values or "b" not in values:
            raise ValueError("sim model: give a= and b= (or profile=NAME)")
        return cls(**values)


class SimModel:
    def __init__(self, profile: SimProfile, name: str, seed: int = 0):
        self.profile = profile
        self.name = name
        self._rng = random.Random(seed)

    @classmethod
    def from_ref(cls, model_ref: str) -> SimModel:
        return cls(SimProfile.parse(model_ref.removeprefix("sim:")), model_ref)

    def warm(self, width: int, height: int) -> None:
        pass

    def run(self, key: CompatKey, images: list[ImageWork]) -> list[Image.Image]:
        if any(CRASH_MARK in w.prompt for w in images):
            os._exit(70)
        time.sleep(self.profile.seconds(len(images), self._rng))
        if any(RAISE_MARK in w.prompt for w in images):
            raise RuntimeError("simulated model failure")
        return [Image.new("RGB", (key.width, key.height), _colour(w.seed)) for w in images]


def _colour(seed: int) -> tuple[int, int, int]:
    return (seed * 67 % 256, seed * 131 % 256, seed * 197 % 256)
