"""The simulated model backend: profiles parse, calls take a·n + b, a host share of each
call burns CPU holding the GIL in short slices, images are valid, and the fault marks raise
or crash."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from workers.backends import load_model
from workers.protocol import EngineConfig
from workers.sim import HOST_SLICE, RAISE_MARK, SimModel, SimProfile
from workers.work import CompatKey, ImageWork


def test_profiles_parse_from_fields_or_a_shipped_file():
    assert SimProfile.parse("a=0.1,b=0.2,noise=0.05") == SimProfile(0.1, 0.2, 0.05)
    shipped = SimProfile.parse("profile=sd15-a100-512")
    assert shipped.a > 0 and shipped.b > 0
    assert SimProfile.parse("profile=sd15-a100-512,b=1").b == 1.0


def test_the_host_share_parses_with_fields_or_a_profile_and_defaults_to_0():
    """host= parses beside a=/b= or profile=NAME, and is 0 (all sleep) when not given."""
    assert SimProfile.parse("a=0.1,b=0.2,noise=0.05,host=0.3") == SimProfile(0.1, 0.2, 0.05, host=0.3)
    assert SimProfile.parse("profile=sd15-a100-512,host=1").host == 1.0
    assert SimProfile.parse("a=0.1,b=0.2").host == 0.0
    assert SimModel.from_ref("sim:a=0.1,b=0.2,host=0.25").profile.host == 0.25


@pytest.mark.parametrize("spec", ["a=1", "b=1", "a=1,b=2,c=3", "nonsense", "a=1,b=1,host=1.5", "a=1,b=1,host=-0.1"])
def test_bad_profiles_say_what_is_wrong(spec):
    with pytest.raises(ValueError, match="sim model"):
        SimProfile.parse(spec)


@pytest.mark.parametrize("host", ["1.01", "-0.5", "nan"])
def test_a_host_share_outside_0_to_1_is_refused_with_its_range(host):
    """host= outside 0..1 (or NaN) is a ValueError naming host= and the range 0 to 1."""
    with pytest.raises(ValueError, match=r"host= .*0 to 1"):
        SimProfile.parse(f"a=1,b=1,host={host}")


def test_a_call_takes_the_profile_time_and_returns_one_image_per_request():
    model = load_model(EngineConfig.one("sim:a=0.01,b=0.02"))
    assert isinstance(model, SimModel)
    key = CompatKey(model.name, 64, 32, 4, 7.5)
    started = time.perf_counter()
    images = model.run(key, [ImageWork("a", None, i) for i in range(3)])
    assert time.perf_counter() - started >= 0.05
    assert images.shape == (3, 32, 64, 3) and images.dtype == np.uint8
    assert not np.array_equal(images[0, 0, 0], images[1, 0, 0])


def test_a_call_reports_each_step_and_stops_when_the_callback_asks():
    """The step callback runs after each of the key's steps; returning True ends the call."""
    model = SimModel(SimProfile(0, 0.04), "sim")
    seen = []
    model.run(CompatKey("sim", 8, 8, 4, 1.0), TWO, on_step=lambda step, total: seen.append((step, total)) and False)
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    stopped = []
    model.run(CompatKey("sim", 8, 8, 4, 1.0), TWO, on_step=lambda step, total: stopped.append(step) or step == 2)
    assert stopped == [1, 2]


def test_noise_varies_call_times_around_the_mean():
    profile = SimProfile(0.1, 0.1, noise=0.1)
    rng = random.Random(0)
    times = [profile.draw(1, rng) for _ in range(2000)]
    assert 0.19 < sum(times) / len(times) < 0.21 and min(times) < 0.19 < 0.21 < max(times)


def test_the_raise_mark_fails_the_call():
    model = SimModel(SimProfile(0, 0), "sim")
    with pytest.raises(RuntimeError, match="simulated"):
        model.run(CompatKey("sim", 8, 8, 1, 1.0), [ImageWork(f"x {RAISE_MARK}", None, 0)])


class FakeTime:
    """Fake clocks for SimModel: sleeping moves the wall clock (by ``oversleep`` more than
    asked); reading the CPU clock again, with no sleep or wall-clock read in between, stands
    for a tick of busy work between the reads: it moves the CPU clock by ``tick`` and the wall
    clock by ``tick / cpu_rate`` (a rate under 1: another thread has the GIL or the core for
    the rest). Records the sleeps and the CPU time burnt between them."""

    def __init__(self, tick: float = 1e-5, cpu_rate: float = 1.0, oversleep: float = 0.0):
        self.tick, self.cpu_rate, self.oversleep = tick, cpu_rate, oversleep
        self.wall = self.cpu = 0.0
        self.sleeps: list[float] = []
        self.busy_runs: list[float] = [0.0]
        self._burning = False

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.wall += seconds + self.oversleep
        self.busy_runs.append(0.0)
        self._burning = False

    def clock(self) -> float:
        self._burning = False
        return self.wall

    def cpu_clock(self) -> float:
        if self._burning:
            self.cpu += self.tick
            self.wall += self.tick / self.cpu_rate
            self.busy_runs[-1] += self.tick
        self._burning = True
        return self.cpu

    def model(self, host: float) -> SimModel:
        profile = SimProfile(0.1, 0.2, host=host)  # 0.4 s for 2 images
        return SimModel(profile, "sim", sleep=self.sleep, clock=self.clock, cpu_clock=self.cpu_clock)


KEY = CompatKey("sim", 8, 8, 1, 1.0)
TWO = [ImageWork("a", None, 0), ImageWork("b", None, 1)]


def test_without_a_host_share_a_call_is_one_sleep_and_no_cpu():
    """host=0 (the default): the whole call is one sleep, as before host= existed."""
    fake = FakeTime()
    fake.model(0.0).run(KEY, TWO)
    assert fake.sleeps == [pytest.approx(0.4)] and fake.cpu == 0.0


def test_the_host_share_is_cpu_in_short_slices_between_sleeps_and_the_call_keeps_its_time():
    """host=0.3: 30% of the call is CPU work in slices of at most HOST_SLICE, each followed
    by a sleep, and uncontended the call still takes a*n + b."""
    fake = FakeTime()
    fake.model(0.3).run(KEY, TWO)
    assert fake.wall == pytest.approx(0.4, abs=1e-4)
    assert fake.cpu == pytest.approx(0.12, abs=1e-4)
    assert sum(fake.sleeps) == pytest.approx(0.28, abs=1e-4)
    assert max(fake.busy_runs) <= HOST_SLICE + 2 * fake.tick
    assert len(fake.sleeps) >= 0.12 / HOST_SLICE  # interleaved, not one burst and one sleep


def test_all_host_is_all_cpu_with_no_sleeps():
    """host=1: the call is CPU work for its whole time and never sleeps (not even sleep(0))."""
    fake = FakeTime()
    fake.model(1.0).run(KEY, TWO)
    assert fake.sleeps == [] and fake.cpu == pytest.approx(0.4, abs=1e-4)


def test_sleeps_that_overrun_are_made_up_by_shorter_or_skipped_ones():
    """A sleep that overruns (timer slack) is taken off the next, so the call keeps its time."""
    fake = FakeTime(oversleep=2e-4)
    fake.model(0.3).run(KEY, TWO)
    assert fake.wall == pytest.approx(0.4, abs=3e-4)
    assert min(fake.sleeps) < 0.28 / len(fake.sleeps)


def test_a_contended_call_takes_longer_because_the_host_share_is_cpu_time_not_a_deadline():
    """When another thread holds the GIL half the time, the host share takes twice its wall
    time and the sleeps do not absorb it: the call slows, as a starved kernel launcher does."""
    fake = FakeTime(cpu_rate=0.5)
    fake.model(0.3).run(KEY, TWO)
    assert fake.cpu == pytest.approx(0.12, abs=1e-4)
    assert fake.wall == pytest.approx(0.28 + 2 * 0.12, abs=1e-3)


def test_with_real_clocks_the_host_share_really_burns_cpu():
    """With the real clocks, a host=0.5 call of 0.2 s uses about 0.1 s of CPU and at least 0.2 s
    of wall time (bounds loose enough for a loaded machine: CPU time is not inflated by load)."""
    model = SimModel(SimProfile(0.0, 0.2, host=0.5), "sim")
    model.run(KEY, TWO)  # warm: the first Image.new costs CPU of its own
    wall, cpu = time.perf_counter(), time.process_time()
    model.run(KEY, TWO)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert wall >= 0.2 * 0.99
    assert 0.1 * 0.95 <= cpu <= 0.1 + 0.05
