"""A simulated model backend: it sleeps for as long as a real model would, and draws
small valid PNGs instead of computing them.

``FLEET_MODEL=sim:a=0.109,b=0.23,noise=0.05`` makes every call take
``(a * images + b) * (1 + noise * N(0, 1))`` seconds: the batch-cost profile of a real
model (fitted from the bare benchmark, or from published figures), so the fleet's own
overhead, scale-out over many workers and batching policies can be measured on a CPU-only
machine, or planned for a GPU not yet bought. ``sim:profile=NAME`` takes ``a`` and ``b``
from a shipped profile (``workers/profiles/NAME.json``).

Sleeping releases the GIL and uses no cores, like a GPU kernel. ``load_s=2`` makes loading take 2 s and
``mem=500`` says its weights take 500 MiB: a swap's cost and a memory budget's count, for
a worker that serves several models. A call is cut into
``steps`` equal parts with the engine's step callback between them (progress, cancel).
``steps=20`` says ``a`` and ``b`` are for a call of 20 steps: a call of 10 then takes half
(without it, every call takes ``a*n + b`` whatever its steps).

Step-level batching (``SimStepper``): a step of the running slots, ``n`` images in all,
takes ``(a*n + b) / steps``, its host share spent as a call's is.

For fault tests, a prompt containing ``[[raise]]`` makes the call raise; the others end
the engine's process as a real model can: ``[[crash]]`` exits at once (a driver abort),
``[[segfault]]`` dereferences a null pointer, ``[[device-lost]]`` raises the error a CUDA
fault becomes, after which the engine exits for a fresh one.

``host=0.3`` (0 to 1, default 0) makes that share of each call host work instead of
sleep: pure-Python arithmetic that holds the GIL and burns a core, in slices of at most
``HOST_SLICE`` (0.5 ms), each followed by its share of the call's sleep (near ``host=1``
that share is shorter than a sleep's own overrun, so some slices run on into the next,
handing the GIL over only at the interpreter's switch interval). It models a
launch-bound GPU: an eager PyTorch pipeline whose step time is the Python that launches its
kernels (argument parsing and dispatch, under the GIL) more than the kernels themselves, as
with small models, small batches or a fast GPU. With ``host=0`` the model call competes
with nothing, which flatters the fleet; with a host share, the worker's own work (encoding
PNGs, uploads, job-store writes, the broker client) competes with the model for the GIL
when the model runs on a thread of the worker's process, and for the cores when it runs in
a process of its own, and slows it, as it would on a real GPU box. The host
share is an amount of CPU time of the calling thread (``time.thread_time``), not a
deadline: when nothing else competes a call still takes ``(a * images + b) * (1 + noise *
N(0, 1))`` seconds, and when another thread holds the GIL or the core, the call takes
longer, as a starved kernel launcher does.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tasks.errors import DeviceLost
from tasks.settings import BatchingMode, WarmShape
from workers.cost import PROFILES, CostProfile
from workers.protocol import ModelSpec
from workers.work import CompatKey, Images, ImageWork, Slots, StepCallback, Stepper

RAISE_MARK = "[[raise]]"
CRASH_MARK = "[[crash]]"
SEGFAULT_MARK = "[[segfault]]"
DEVICE_LOST_MARK = "[[device-lost]]"
HOST_SLICE = 0.0005  # seconds: the longest stretch of host work that holds the GIL at once


@dataclass(frozen=True)
class SimProfile(CostProfile):
    noise: float = 0.0  # relative standard deviation of a call's time
    host: float = 0.0  # share of a call that is GIL-holding Python (kernel launches), 0..1
    load_s: float = 0.0  # seconds loading the model takes (what a swap costs)
    mem: float = 0.0  # MiB its weights take (what a memory budget counts)
    #: The steps ``a`` and ``b`` are for: a call of k steps then takes k/steps of it. 0: every
    #: call takes ``a*n + b`` whatever its steps.
    steps: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.host <= 1.0:  # also refuses NaN
            raise ValueError(f"sim model: host= is the share of a call spent in Python, 0 to 1; got {self.host}")

    @property
    def weight_bytes(self) -> int:
        return int(self.mem * 2**20)

    def draw(self, images: int, rng: random.Random, steps: int = 0) -> float:
        """One call's time (of ``steps`` steps): the profile's, with its noise."""
        share = steps / self.steps if self.steps and steps else 1.0
        return max(0.0, share * self.seconds(images) * (1 + self.noise * rng.gauss(0, 1)))

    @classmethod
    def parse(cls, spec: str) -> SimProfile:
        """``a=0.1,b=0.2,noise=0.05,host=0.3,load_s=2,mem=500,steps=20`` or
        ``profile=NAME[,noise=...]...``."""
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
        unknown = set(fields) - {"a", "b", "noise", "host", "load_s", "mem", "steps"}
        if unknown:
            raise ValueError(f"sim model: unknown field(s) {sorted(unknown)}")
        values.update({k: float(v) for k, v in fields.items()})
        if "a" not in values or "b" not in values:
            raise ValueError("sim model: give a= and b= (or profile=NAME)")
        return cls(**values)


class SimModel:
    """``sleep``, ``clock`` (wall) and ``cpu_clock`` (this thread's CPU time) are the real
    ones unless a test passes fakes."""

    #: A simulation stands for whatever device its profile was measured on, so it does
    #: not guess: ``FLEET_BATCHING=step`` runs it step-level.
    batching: BatchingMode = "request"

    def __init__(
        self,
        profile: SimProfile,
        name: str,
        seed: int = 0,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.perf_counter,
        cpu_clock: Callable[[], float] = time.thread_time,
    ):
        self.profile = profile
        self.name = name
        self._rng = random.Random(seed)
        self._sleep = sleep
        self._clock = clock
        self._cpu_clock = cpu_clock

    @classmethod
    def from_ref(cls, model_ref: str) -> SimModel:
        return cls(SimProfile.parse(model_ref.removeprefix("sim:")), model_ref)

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> SimModel:
        """Loaded as a registry entry says: it takes ``load_s=`` seconds."""
        model = cls.from_ref(spec.ref)
        model._sleep(model.profile.load_s)
        return model

    def warm(self, shape: WarmShape) -> None:
        pass

    def weight_bytes(self) -> int:
        return self.profile.weight_bytes

    def release(self) -> None:
        pass

    def memory_stats(self) -> tuple[int, int, int] | None:
        return None

    def run(self, key: CompatKey, images: list[ImageWork], on_step: StepCallback | None = None) -> np.ndarray:
        prompts = " ".join(w.prompt for w in images)
        _faults(prompts)
        seconds = self.profile.draw(len(images), self._rng, key.steps)
        steps = max(1, key.steps)
        for step in range(1, steps + 1):
            self._spend(seconds / steps)
            if on_step is not None and on_step(step, steps):
                break
        if RAISE_MARK in prompts:
            raise RuntimeError("simulated model failure")
        return _draw(key, images)

    def stepper(self, key: CompatKey) -> Stepper:
        return SimStepper(self)

    def _spend(self, seconds: float) -> None:
        """Take ``seconds``: the host share as GIL-holding slices of CPU work, each followed
        by its share of the rest asleep. What the slices or the sleeps overrun is taken off
        the next ones of their kind, so that uncontended the call lasts ``seconds``; time
        lost to other threads is not made up, so contended it lasts longer. Host share is
        this thread's CPU time outside the sleep calls (the loop's own overhead included)."""
        host = self.profile.host * seconds
        if host <= 0.0:
            self._sleep(seconds)
            return
        slices = max(1, math.ceil(host / HOST_SLICE))
        busy_each, asleep_each = host / slices, (seconds - host) / slices
        busy_owed = asleep_owed = 0.0
        mark = self._cpu_clock()
        for _ in range(slices):
            busy_owed += busy_each
            used = _burn(mark, busy_owed, self._cpu_clock)
            asleep_owed += asleep_each
            if asleep_owed > 0.0:  # after an overrun, skip until it is paid off (sleep(0) costs ~70 us)
                started = self._clock()
                self._sleep(asleep_owed)
                asleep_owed -= self._clock() - started
                busy_owed -= used
                mark = self._cpu_clock()


@dataclass(eq=False)
class SimSlots:
    key: CompatKey
    work: list[ImageWork]
    step_index: int = 0

    @property
    def steps(self) -> int:
        return max(1, self.key.steps)

    @property
    def done(self) -> bool:
        return self.step_index >= self.steps


class SimStepper:
    """The simulated model run step by step: a step of slots holding ``n`` images takes
    ``(a*n + b) / steps`` (the profile's ``steps``, else the longest running batch's), its
    host share spent as a call's is. ``[[raise]]`` fails the decode of the batches that
    finish with it; the other marks end the engine when their batch is admitted."""

    def __init__(self, model: SimModel):
        self._model = model

    def admit(self, batches: Sequence[tuple[CompatKey, list[ImageWork]]]) -> list[Slots]:
        _faults(" ".join(w.prompt for _, images in batches for w in images))
        return [SimSlots(key, images) for key, images in batches]

    def step(self, running: Sequence[Slots]) -> None:
        batches = [_sim_slots(s) for s in running]
        per_call = self._model.profile.steps or max(s.steps for s in batches)
        seconds = self._model.profile.draw(sum(len(s.work) for s in batches), self._model._rng) / per_call
        self._model._spend(seconds)
        for slots in batches:
            slots.step_index += 1

    def decode(self, finished: Sequence[Slots]) -> list[Images]:
        batches = [_sim_slots(slots) for slots in finished]
        if any(RAISE_MARK in w.prompt for sim in batches for w in sim.work):
            raise RuntimeError("simulated model failure")
        return [_draw(sim.key, sim.work) for sim in batches]


def _sim_slots(slots: Slots) -> SimSlots:
    if not isinstance(slots, SimSlots):
        raise TypeError(f"a sim model steps its own slots, not {type(slots).__name__}")
    return slots


def _faults(prompts: str) -> None:
    """The marks that end the engine's process as a real model's faults can."""
    if CRASH_MARK in prompts:
        os._exit(70)
    if SEGFAULT_MARK in prompts:
        ctypes.string_at(0)
    if DEVICE_LOST_MARK in prompts:
        raise DeviceLost("CUDA error: an illegal memory access was encountered (simulated)")


def _draw(key: CompatKey, images: list[ImageWork]) -> Images:
    """A plain colour per image, from its seed."""
    out = np.empty((len(images), key.height, key.width, 3), dtype=np.uint8)
    out[...] = np.array([_colour(w.seed) for w in images], dtype=np.uint8)[:, None, None, :]
    return out


def _burn(mark: float, seconds: float, cpu_clock: Callable[[], float]) -> float:
    """Pure-Python arithmetic, holding the GIL, until ``cpu_clock`` (this thread's CPU
    time) is ``seconds`` past ``mark``; returns how far past it is."""
    x = 0
    while (used := cpu_clock() - mark) < seconds:
        for i in range(64):
            x = (x + i * i) % 1_000_003
    return used


def _colour(seed: int) -> tuple[int, int, int]:
    return (seed * 67 % 256, seed * 131 % 256, seed * 197 % 256)
