"""A request mix: which jobs a load test sends, with what weights, read from a small JSON
file (``fleet/bench/mixes/`` ships ``default``, ``reference-128`` and ``reference-64``)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

MIXES = Path(__file__).parent / "mixes"
WORDS = (
    "a an the red blue quiet old tall bright lighthouse harbour fox forest city river at dusk in fog under snow".split()
)


@dataclass(frozen=True)
class RequestShape:
    weight: float
    width: int
    height: int
    steps: int
    num_images: int = 1
    prompt_words: tuple[int, int] = (3, 12)
    model: str | None = None  # None: the fleet's default model

    def body(self, rng: random.Random, seed: int) -> dict:
        words = rng.randint(*self.prompt_words)
        body = {
            "prompt": " ".join(rng.choice(WORDS) for _ in range(words)),
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "num_images": self.num_images,
            "seed": seed,
        }
        return body if self.model is None else {**body, "model": self.model}


@dataclass(frozen=True)
class RequestMix:
    name: str
    shapes: tuple[RequestShape, ...]

    @classmethod
    def load(cls, name_or_path: str) -> RequestMix:
        path = Path(name_or_path)
        if not path.exists():
            path = MIXES / f"{name_or_path}.json"
        data = json.loads(path.read_text())
        shapes = tuple(
            RequestShape(**{**shape, "prompt_words": tuple(shape.get("prompt_words", (3, 12)))})
            for shape in data["requests"]
        )
        if not shapes or any(s.weight <= 0 for s in shapes):
            raise ValueError(f"{path}: a mix needs requests with positive weights")
        return cls(path.stem, shapes)

    def sample(self, rng: random.Random, seed: int) -> dict:
        shape = rng.choices(self.shapes, weights=[s.weight for s in self.shapes])[0]
        return shape.body(rng, seed)

    @property
    def mean_images(self) -> float:
        total = sum(s.weight for s in self.shapes)
        return sum(s.weight * s.num_images for s in self.shapes) / total
