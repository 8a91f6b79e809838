"""The judge of ``fleet bench quality``: a classifier of handwritten digits that is not the
generator, and the figures it gives a set of images, each with a 95% confidence interval.

The judge is scikit-learn's ``MLPClassifier`` (one hidden layer of 64 ReLU units, fixed
seed) trained on the ``judge`` part of the digits split (``workers.digits_data``), which the
generator never saw, and scored on the ``held_out`` part, which neither saw. It reads an
image as the 8x8 digit it shows (``to_digits``); its hidden layer is the feature space of the
Fréchet distance, as Inception's is for FID.

- **adherence**: the share of images the judge reads as the digit their prompt asked for
  (Wilson interval);
- **Fréchet distance** between the judge's features of the images and of the real held-out
  digits (normal interval, its standard error from resampling both sets);
- **diversity**: the mean distance between two images of the same digit, in those features,
  over the same for the real held-out digits (1.0: as varied as real handwriting; a model
  that draws each digit's average scores near 0) (interval as the distance's);
- **fidelity**: PSNR against the reference recipe's image from the same seed and prompt
  (normal interval of the mean; identical images count as ``PSNR_CAP`` dB).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.digits_data import DIGIT_MAX, SEED, split, to_digits

#: z for a two-sided 95% interval
Z95 = 1.959963984540054
BOOTSTRAP = 200
#: the PSNR an identical image counts as (its own is infinite)
PSNR_CAP = 100.0


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return {"value": round(self.value, 4), "low": round(self.low, 4), "high": round(self.high, 4)}

    def __str__(self) -> str:
        return f"{self.value:.3g} [{self.low:.3g}, {self.high:.3g}]"


class Judge:
    """The trained classifier; ``accuracy`` is its score on the real held-out digits."""

    def __init__(self) -> None:
        from sklearn.neural_network import MLPClassifier

        parts = split()
        self._classifier: Any = MLPClassifier((64,), alpha=1e-3, max_iter=2000, random_state=SEED)
        self._classifier.fit(_flat(parts["judge"].images), parts["judge"].labels)
        self.held_out = parts["held_out"]
        self.accuracy = adherence(self.predict(self.held_out.images), self.held_out.labels)
        self._real_features = self.features(self.held_out.images)

    def predict(self, digits: np.ndarray) -> np.ndarray:
        return np.asarray(self._classifier.predict(_flat(digits)))

    def features(self, digits: np.ndarray) -> np.ndarray:
        """The hidden layer's activations: (n, 64)."""
        weights, bias = self._classifier.coefs_[0], self._classifier.intercepts_[0]
        return np.maximum(_flat(digits) @ weights + bias, 0.0)

    def score(self, images: np.ndarray, asked: np.ndarray, reference: np.ndarray | None = None) -> dict[str, Any]:
        """The figures for generated ``images`` (n, H, W, 3) uint8 whose prompts asked for
        the digits ``asked``; fidelity against ``reference`` (the same seeds and prompts
        under the reference recipe), if given."""
        digits = to_digits(images)
        figures = self.score_digits(digits, asked)
        if reference is not None:
            figures["psnr_db"] = psnr(images, reference)
        return figures

    def score_digits(self, digits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
        features = self.features(digits)
        rng = np.random.default_rng(SEED)
        return {
            "images": len(digits),
            "adherence": adherence(self.predict(digits), labels),
            "frechet": _bootstrap(
                lambda a, b: frechet(features[a], self._real_features[b]), len(digits), len(self._real_features), rng
            ),
            "diversity": _bootstrap(
                lambda a, b: spread(features[a], labels[a]) / spread(self._real_features[b], self.held_out.labels[b]),
                len(digits),
                len(self._real_features),
                rng,
            ),
        }

    def real_halves(self) -> Interval:
        """The Fréchet distance between two halves of the real held-out digits: the noise
        floor of the distance at that sample size (the mean over random splits in two, and
        the 2.5-97.5 percentiles of the splits)."""
        n = len(self._real_features)
        rng = np.random.default_rng(SEED)
        values = []
        for _ in range(BOOTSTRAP):
            order = rng.permutation(n)
            values.append(frechet(self._real_features[order[: n // 2]], self._real_features[order[n // 2 :]]))
        return Interval(float(np.mean(values)), *map(float, np.percentile(values, [2.5, 97.5])))


def adherence(predicted: np.ndarray, asked: np.ndarray) -> Interval:
    """The share read as asked, with its Wilson 95% interval."""
    n = len(asked)
    share = float(np.mean(predicted == asked))
    centre = (share + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(share * (1 - share) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return Interval(share, centre - half, centre + half)


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance between Gaussians fitted to feature sets ``a`` and ``b``."""
    from scipy import linalg

    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    # a unit the ReLU never fires has no variance: a small offset keeps the root defined
    offset = 1e-6 * np.eye(a.shape[1])
    cov_a, cov_b = np.cov(a, rowvar=False) + offset, np.cov(b, rowvar=False) + offset
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    trace = np.trace(cov_a + cov_b - 2 * np.real(root))
    return float(np.sum((mean_a - mean_b) ** 2) + trace)


def spread(features: np.ndarray, labels: np.ndarray) -> float:
    """The mean distance between two images of the same digit."""
    distances = []
    for digit in np.unique(labels):
        group = features[labels == digit]
        if len(group) > 1:
            gaps = np.linalg.norm(group[:, None, :] - group[None, :, :], axis=-1)
            distances.append(gaps.sum() / (len(group) * (len(group) - 1)))
    return float(np.mean(distances))


def psnr(images: np.ndarray, reference: np.ndarray) -> Interval:
    """PSNR (dB, 8-bit) of each image against its reference, mean and normal 95% interval."""
    error = ((images.astype(np.float64) - reference.astype(np.float64)) ** 2).reshape(len(images), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        values = np.minimum(10 * np.log10(255.0**2 / error), PSNR_CAP)
    mean, sd = float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0
    half = Z95 * sd / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half)


def _bootstrap(statistic: Any, n_a: int, n_b: int, rng: np.random.Generator) -> Interval:
    """The statistic on every image, give or take 1.96 standard errors, the error measured
    on ``BOOTSTRAP`` resamples of both sets. A normal interval, not percentiles: a Fréchet
    distance is biased up on a resample (repeats shrink its covariance), so percentile
    intervals sit above the figure they bound."""
    whole = statistic(np.arange(n_a), np.arange(n_b))
    values = [statistic(rng.integers(0, n_a, n_a), rng.integers(0, n_b, n_b)) for _ in range(BOOTSTRAP)]
    half = Z95 * float(np.std(values, ddof=1))
    return Interval(whole, whole - half, whole + half)


def _flat(digits: np.ndarray) -> np.ndarray:
    return digits.reshape(len(digits), -1) / DIGIT_MAX
