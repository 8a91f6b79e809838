"""The physical limit: the pipeline timed in-process, no API, broker or storage."""

from __future__ import annotations

import time
from dataclasses import dataclass

from tqdm import tqdm

from workers.work import CompatKey, ImageWork


@dataclass(frozen=True)
class BareRow:
    batch_size: int
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def per_call_s(self) -> float:
        return self.seconds / (self.images / self.batch_size)


def time_bare(model, key: CompatKey, batch_size: int, calls: int) -> BareRow:
    """``calls`` back-to-back calls of ``batch_size`` images, after one untimed warm-up call."""

    def batch(call: int) -> list[ImageWork]:
        return [ImageWork(f"bench {call} {i}", None, call * batch_size + i) for i in range(batch_size)]

    model.run(key, batch(-1))
    started = time.perf_counter()
    for call in tqdm(range(calls), desc=f"bare batch {batch_size}", unit="call", leave=False):
        model.run(key, batch(call))
    return BareRow(batch_size, batch_size * calls, time.perf_counter() - started)


def measure_bare(model_ref: str, size: int, steps: int, device: str, calls: dict[int, int]) -> dict[int, BareRow]:
    """Batch size -> its row, the model loaded and run on this one thread."""
    from workers.backends import load_model
    from workers.protocol import EngineConfig

    model = load_model(EngineConfig.one(model_ref, device=device))
    key = CompatKey(model.name, size, size, steps, 7.5)
    return {batch: time_bare(model, key, batch, n) for batch, n in calls.items()}
