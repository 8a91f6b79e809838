"""The judge and its figures: a classifier good enough to judge (at least 95% on real digits
neither it nor the generator saw), and intervals that mean what they say."""

from __future__ import annotations

import numpy as np
import pytest

from fleet.bench.judge import PSNR_CAP, Judge, adherence, frechet, psnr
from workers.digits import real_images


@pytest.fixture(scope="module")
def judge() -> Judge:
    return Judge()


def test_the_judge_reads_real_held_out_digits_at_95_percent_or_better(judge):
    assert judge.accuracy.value >= 0.95 and judge.accuracy.low > 0.93
    assert len(judge.held_out.labels) == 397


def test_real_digits_score_as_the_ceiling(judge):
    """Real digits drawn as images: the judge's own accuracy, no distance, full diversity."""
    figures = judge.score(real_images(judge.held_out.images), judge.held_out.labels)
    assert figures["adherence"].value == judge.accuracy.value
    assert figures["frechet"].value == pytest.approx(0, abs=1e-3)
    assert figures["diversity"].value == pytest.approx(1.0, abs=1e-3)  # 8-bit rounding only


def test_every_digit_drawn_as_its_average_is_read_right_but_caught_by_distance_and_diversity(judge):
    """What adherence alone rewards: each image its digit's mean. The judge reads them, but
    their Fréchet distance is over twice that of two halves of real digits (the benchmark's
    bound for the reference recipe), their diversity near 0."""
    held = judge.held_out
    means = np.stack([held.images[held.labels == d].mean(axis=0) for d in range(10)])
    averages = real_images(means[held.labels])
    figures = judge.score(averages, held.labels)
    assert figures["adherence"].value > 0.9
    assert figures["frechet"].low > 2 * judge.real_halves().value
    assert figures["diversity"].value < 0.05


def test_the_intervals():
    share = adherence(np.array([1] * 90 + [0] * 10), np.ones(100, dtype=int))
    assert (
        share.value == 0.9
        and share.low == pytest.approx(0.8256, abs=1e-3)
        and share.high == pytest.approx(0.9448, abs=1e-3)
    )
    features = np.random.default_rng(0).normal(size=(500, 8))
    assert frechet(features, features) == pytest.approx(0, abs=1e-6)
    assert frechet(features, features + 2.0) == pytest.approx(8 * 4.0, rel=1e-6)
    images = np.random.default_rng(1).integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    assert psnr(images, images).value == PSNR_CAP
    noisy = np.clip(images.astype(int) + 1, 0, 255).astype(np.uint8)
    assert 45 < psnr(noisy, images).value < 50
