"""The physical limit: the pipeline timed in-process, no API, broker or storage."""

from __future__ import annotations

import time
from dataclasses import dataclass

from tqdm import tqdm

from workers.pipeline import DiffusersModel
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


def time_bare(model: DiffusersModel, key: CompatKey, batch_size: int, calls: int) -> BareRow:
    """``calls`` back-to-back calls of ``batch_size`` images, after one untimed warm-up call."""

    def batch(call: int) -> list[ImageWork]:
        return [ImageWork(f"bench {call} {i}", None, call * batch_size + i) for i in range(batch_size)]

    model.run(key, batch(-1))
    started = time.perf_counter()
    for call in tqdm(range(calls), desc=f"bare batch {batch_size}", unit="call", leave=False):
        model.run(key, batch(call))
    return BareRow(batch_size, batch_size * calls, time.perf_counter() - started)
