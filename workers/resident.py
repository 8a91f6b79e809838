"""The models an engine keeps loaded: the most recently used, within a memory budget.

A worker may serve more models than fit in its device's memory (``FLEET_SERVE`` names
several, ``FLEET_MODEL_MEMORY_MB`` is the budget). The engine loads the first at start;
a batch for another loads it then (a swap: ``Swapped`` tells the worker what it cost),
after evicting the least recently used models until the newcomer is expected to fit. What
a model takes is known once it has been loaded (``Model.weight_bytes``); before that, its
weight files' size on disk stands in (``expected_bytes``), which over-counts a model
stored in a wider dtype than it runs in, never under-counts it. The model being loaded is
never evicted to make room for itself: a budget smaller than one model keeps just that one.

Runs on the engine's one thread; no torch here (the models are ``workers.work.Model``).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import PipelineError
from tasks.settings import BatchingMode
from workers.protocol import ModelSpec
from workers.work import Model

log = logging.getLogger(__name__)

#: Files whose bytes are weights in a diffusers directory.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class Load:
    """What loading one model cost, and what stays loaded after it."""

    model: str
    load_s: float
    warm_s: float
    resident: tuple[str, ...]
    batching: BatchingMode = "request"  # the model's own (``Model.batching``)


class ResidentModels:
    """``get(name)`` the model a batch names, loading it (and evicting others) if need be."""

    def __init__(self, specs: tuple[ModelSpec, ...], budget: int, load: Callable[[ModelSpec], Model]):
        self._specs = {spec.key: spec for spec in specs}
        self._budget = budget
        self._load = load
        self._loaded: OrderedDict[str, Model] = OrderedDict()  # least recently used first
        self._sizes: dict[str, int] = {}

    @property
    def resident(self) -> tuple[str, ...]:
        return tuple(self._loaded)

    def get(self, name: str) -> tuple[Model, Load | None]:
        """The model ``name`` and, if it had to be loaded now, what that cost. Raises
        ``PipelineError`` for a model this engine does not serve; whatever loading raises."""
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return self._loaded[name], None
        spec = self._specs.get(name)
        if spec is None:
            raise PipelineError(f"this worker does not serve model {name!r} (it serves {', '.join(self._specs)})")
        self._make_room(name, self._sizes.get(name) or expected_bytes(spec))
        log.info("loading model %s (loaded: %s)", name, ", ".join(self._loaded) or "none")
        started = time.perf_counter()
        model = self._load(spec)
        loaded = time.perf_counter()
        for shape in spec.warm:
            model.warm(shape)
        warm_s = time.perf_counter() - loaded
        self._loaded[name] = model
        self._sizes[name] = model.weight_bytes()
        self._make_room(name, 0)  # now that its true size is known
        log.info(
            "model %s loaded in %.2fs, warm in %.2fs (%d MiB); loaded: %s",
            name, loaded - started, warm_s, self._sizes[name] >> 20, ", ".join(self._loaded),
        )  # fmt: skip
        return model, Load(name, loaded - started, warm_s, self.resident, model.batching)

    def _make_room(self, name: str, incoming: int) -> None:
        """Evict the least recently used models (never ``name``) until ``incoming`` more
        bytes fit in the budget."""
        if self._budget <= 0:
            return
        for other in [n for n in self._loaded if n != name]:
            used = sum(self._sizes.get(n, 0) for n in self._loaded)
            if used + incoming <= self._budget:
                return
            self._evict(other)

    def _evict(self, name: str) -> None:
        model = self._loaded.pop(name)
        try:
            model.release()
        except Exception:  # the model is dropped either way
            log.exception("releasing model %s failed", name)
        log.info("model %s evicted to stay within the memory budget (%d MiB)", name, self._budget >> 20)


def expected_bytes(spec: ModelSpec) -> int:
    """Before a model was ever loaded: its weight files' size on disk (0 where unknown)."""
    if spec.ref.startswith("sim:"):
        from workers.sim import SimProfile

        return SimProfile.parse(spec.ref.removeprefix("sim:")).weight_bytes
    root = Path(spec.ref)
    if not root.is_dir():
        return 0
    return sum(f.stat().st_size for f in root.rglob("*") if f.suffix in WEIGHT_SUFFIXES and f.is_file())
