"""The cost of one model call: ``t(n) = a*n + b`` seconds for ``n`` images.

One definition, shared by the batcher's online cost model, the capacity planner and the
simulated model backend; shipped profiles (``workers/profiles/NAME.json``) hold ``a`` and
``b`` measured here or taken from published figures, with their sources.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PROFILES = Path(__file__).parent / "profiles"


@dataclass(frozen=True)
class CostProfile:
    a: float  # seconds per image
    b: float  # seconds per call

    def seconds(self, images: int) -> float:
        return self.a * images + self.b

    @classmethod
    def fit(cls, points: Iterable[tuple[int, float]]) -> CostProfile | None:
        """Least squares over ``(images, seconds)`` pairs; None until two batch sizes are seen."""
        points = list(points)
        n = len(points)
        if n == 0:
            return None
        mean_x = sum(x for x, _ in points) / n
        mean_y = sum(y for _, y in points) / n
        var_x = sum((x - mean_x) ** 2 for x, _ in points)
        if var_x == 0:
            return None
        a = sum((x - mean_x) * (y - mean_y) for x, y in points) / var_x
        return cls(a, mean_y - a * mean_x)

    @classmethod
    def load(cls, name_or_path: str | Path) -> CostProfile:
        """A shipped profile by name (``tiny-cpu-128``) or any JSON file with ``a`` and ``b``."""
        path = Path(name_or_path)
        if path.suffix != ".json":
            path = PROFILES / f"{name_or_path}.json"
        data = json.loads(path.read_text())
        return cls(float(data["a"]), float(data["b"]))
