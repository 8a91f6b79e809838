"""scikit-learn's handwritten digits as the digits model (``workers.digits``) and its judge
(``fleet.bench.judge``) see them, without torch: the fixed split, the prompts, and generated
images read back as digits.

``load_digits``: 1,797 8x8 images of the digits 0-9 (ink 0-16), from the UCI collection,
shipped inside the scikit-learn wheel. The split is fixed: the generator trains on
``TRAIN`` images, the judge on the next ``JUDGE``, and the rest (397) are held out from both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SEED = 0
#: the trained model the repository ships (``fleet model train digits`` made it)
SHIPPED = Path(__file__).resolve().parents[1] / "models" / "digits"
#: the 4-step model distilled from it (``fleet model distill digits`` made it)
SHIPPED_DISTILLED = SHIPPED.with_name("digits-4step")
#: the model's images are SIDE x SIDE: each digit scaled up 4x
SIDE = 32
#: scikit-learn's digits are 8x8, ink 0-16
DIGIT_SIDE = 8
DIGIT_MAX = 16.0
#: the prompts the model is trained on, for digit d; PROMPT is the one benchmarks use
TEMPLATES = ("a handwritten {}", "the digit {}", "{}")
PROMPT = TEMPLATES[0]
#: images per split: the generator's, the judge's, and held out from both
TRAIN, JUDGE = 1000, 400


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (n, 8, 8) float32, ink 0-16
    labels: np.ndarray  # (n,) int64


def split() -> dict[str, Split]:
    """The fixed split of the 1,797 digits: ``generator`` (TRAIN), ``judge`` (JUDGE) and
    ``held_out`` (the rest, 397): a seeded shuffle, stratified by nothing but chance."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(SEED).permutation(len(data.target))
    images = data.images.astype(np.float32)[order]
    labels = data.target.astype(np.int64)[order]
    bounds = {"generator": (0, TRAIN), "judge": (TRAIN, TRAIN + JUDGE), "held_out": (TRAIN + JUDGE, len(labels))}
    return {name: Split(images[a:b], labels[a:b]) for name, (a, b) in bounds.items()}


def to_digits(images: np.ndarray) -> np.ndarray:
    """Generated images (n, H, W, 3) uint8 back to 8x8 digits (ink 0-16), as the judge
    reads them: gray, then each 4x4 block averaged (any side that is a multiple of 8)."""
    gray = images.astype(np.float32).mean(axis=-1) / 255.0
    n, height, width = gray.shape
    blocks = gray.reshape(n, DIGIT_SIDE, height // DIGIT_SIDE, DIGIT_SIDE, width // DIGIT_SIDE)
    return blocks.mean(axis=(2, 4)) * DIGIT_MAX


def prompt(digit: int, template: str = PROMPT) -> str:
    return template.format(digit)
