"""The simulated model backend: profiles parse, calls take a·n + b, images are valid, and
the fault marks raise or crash."""

from __future__ import annotations

import random
import time

import pytest

from workers.backends import load_model
from workers.sim import RAISE_MARK, SimModel, SimProfile
from workers.work import CompatKey, ImageWork


def test_profiles_parse_from_fields_or_a_shipped_file():
    assert SimProfile.parse("a=0.1,b=0.2,noise=0.05") == SimProfile(0.1, 0.2, 0.05)
    shipped = SimProfile.parse("profile=sd15-a100-512")
    assert shipped.a > 0 and shipped.b > 0
    assert SimProfile.parse("profile=sd15-a100-512,b=1").b == 1.0


@pytest.mark.parametrize("spec", ["a=1", "b=1", "a=1,b=2,c=3", "nonsense"])
def test_bad_profiles_say_what_is_wrong(spec):
    with pytest.raises(ValueError, match="sim model"):
        SimProfile.parse(spec)


def test_a_call_takes_the_profile_time_and_returns_one_image_per_request():
    model = load_model("sim:a=0.01,b=0.02")
    assert isinstance(model, SimModel)
    key = CompatKey(model.name, 64, 32, 4, 7.5)
    started = time.perf_counter()
    images = model.run(key, [ImageWork("a", None, i) for i in range(3)])
    assert time.perf_counter() - started >= 0.05
    assert [im.size for im in images] == [(64, 32)] * 3
    assert images[0].getpixel((0, 0)) != images[1].getpixel((0, 0))


def test_noise_varies_call_times_around_the_mean():
    profile = SimProfile(0.1, 0.1, noise=0.1)
    rng = random.Random(0)
    times = [profile.seconds(1, rng) for _ in range(2000)]
    assert 0.19 < sum(times) / len(times) < 0.21 and min(times) < 0.19 < 0.21 < max(times)


def test_the_raise_mark_fails_the_call():
    model = SimModel(SimProfile(0, 0), "sim")
    with pytest.raises(RuntimeError, match="simulated"):
        model.run(CompatKey("sim", 8, 8, 1, 1.0), [ImageWork(f"x {RAISE_MARK}", None, 0)])
