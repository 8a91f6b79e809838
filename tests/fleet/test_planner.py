"""The capacity planner: profiles, the fleet simulation and the search over fleet sizes."""

from __future__ import annotations

import json

import pytest

from fleet.bench.planner import (
    MAX_UTILIZATION,
    Profile,
    ideal,
    plan,
    saturation_throughput,
    simulate,
)
from workers.batcher import BatchPolicy
from workers.cost import PROFILES
from workers.sim import SimProfile

TINY = Profile.load("tiny-cpu-128")
SHIPPED = ("tiny-cpu-128", "tiny-cpu-64", "sd15-a100-512", "sd15-h100-512")


def test_fit_recovers_a_and_b():
    """Least squares over call times of a linear cost gives back its per-image and per-call terms."""
    fitted = Profile.fit((n, 0.2 * n + 0.5) for n in (1, 2, 4, 8))
    assert fitted.a == pytest.approx(0.2)
    assert fitted.b == pytest.approx(0.5)
    two_points = Profile.fit([(1, 0.34), (8, 1.1)])
    assert two_points.seconds(1) == pytest.approx(0.34)
    assert two_points.seconds(8) == pytest.approx(1.1)
    assert Profile.fit([(1, 0.34)]) is None, "one batch size says nothing of a and b"


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_loads(name):
    """Each shipped profile has its documented fields and loads the same in the planner and the sim backend."""
    data = json.loads((PROFILES / f"{name}.json").read_text())
    assert {"name", "description", "a", "b", "source", "notes"} <= set(data)
    assert data["name"] == name
    profile = Profile.load(name)
    assert profile.a > 0 and profile.b > 0
    assert Profile.load(PROFILES / f"{name}.json") == profile
    sim = SimProfile.parse(f"profile={name}")
    assert (sim.a, sim.b) == (profile.a, profile.b)


def test_shipped_profiles_reproduce_their_source_figures():
    """The fitted profiles give back the measured or published call times they were fitted from."""
    assert TINY.seconds(1) == pytest.approx(0.34, abs=1e-5) and TINY.seconds(8) == pytest.approx(1.1, abs=1e-5)
    small = Profile.load("tiny-cpu-64")
    assert small.seconds(1) == pytest.approx(0.25, abs=1e-5) and small.seconds(8) == pytest.approx(0.52, abs=1e-5)
    a100 = Profile.load("sd15-a100-512")
    assert 1 / a100.seconds(1) == pytest.approx(0.85, abs=1e-4)
    assert 8 / a100.seconds(8) == pytest.approx(1.65, abs=1e-4)
    h100 = Profile.load("sd15-h100-512")
    assert h100.seconds(8) == pytest.approx(a100.seconds(8) / 2, rel=1e-5)  # the stated 2x estimate


def test_low_load_throughput_equals_the_arrival_rate():
    """Below capacity the fleet serves what arrives: throughput is the arrival rate."""
    result = simulate(TINY, 1.0, BatchPolicy(8, 0.05), jobs=2000)
    assert result.throughput_images_per_s == pytest.approx(1.0, rel=0.05)
    assert result.utilization < 0.2


def test_overload_throughput_approaches_saturation():
    """Past capacity every call is a full batch and throughput is max_batch / t(max_batch)."""
    capacity = saturation_throughput(TINY, 8)
    result = simulate(TINY, 1.5 * capacity, BatchPolicy(8, 0.05), jobs=3000)
    assert result.throughput_images_per_s == pytest.approx(capacity, rel=0.10)
    assert result.mean_batch_images > 7.5


def test_ideal_batcher_p95_is_about_3_5x_the_batch_one_time():
    """The zero-overhead greedy batcher at 50% load has p95 about 3.5x t(1) (docs/DESIGN.md's floor)."""
    rate = 0.5 * saturation_throughput(TINY, 8)
    result = ideal(TINY, rate, max_batch_images=8, jobs=10_000)
    assert 3.0 <= result.p95 / TINY.seconds(1) <= 4.0
    assert result.p50 < result.p95 < result.p99


def test_more_workers_lower_p95_at_a_fixed_rate():
    """At a high fixed rate, adding workers lowers p95."""
    rate = 0.8 * saturation_throughput(TINY, 8)
    p95s = [simulate(TINY, rate, BatchPolicy(8, 0.0), workers=w, jobs=2000).p95 for w in (1, 2, 4)]
    assert p95s[0] > p95s[1] > p95s[2]


def test_four_workers_sustain_four_times_one_workers_saturation():
    """Scale-out is linear: four workers serve about 4x one worker's full-batch throughput."""
    one = simulate(TINY, 1.5 * saturation_throughput(TINY, 8), BatchPolicy(8, 0.0), jobs=2000)
    four = simulate(TINY, 1.5 * saturation_throughput(TINY, 8, 4), BatchPolicy(8, 0.0), workers=4, jobs=4000)
    assert four.throughput_images_per_s / one.throughput_images_per_s == pytest.approx(4.0, rel=0.05)


def test_a_job_larger_than_the_batch_is_split_and_finishes():
    """Jobs of several images are cut into slices and each counts once, when its last image is done."""
    result = simulate(TINY, 0.5, BatchPolicy(2, 0.0), jobs=500, images_per_job=3)
    assert len(result.latencies) == 450  # 10% warm-up left out
    assert result.throughput_images_per_s == pytest.approx(1.5, rel=0.1)
    assert min(result.latencies) >= TINY.seconds(2) + TINY.seconds(1) - 1e-9


def test_simulation_is_deterministic_and_overhead_adds_to_every_job():
    """Same seed, same latencies; overhead_s shifts every job's latency without taking model time."""
    policy = BatchPolicy(4, 0.05, "adaptive")
    base = simulate(TINY, 3.0, policy, jobs=500, seed=7)
    assert simulate(TINY, 3.0, policy, jobs=500, seed=7) == base
    slower = simulate(TINY, 3.0, policy, jobs=500, seed=7, overhead_s=0.25)
    assert slower.p95 == pytest.approx(base.p95 + 0.25)
    assert slower.throughput_images_per_s == base.throughput_images_per_s


def test_plan_meets_a_reachable_goal():
    """plan() finds a fleet whose simulated p95 meets the goal below the utilisation cap."""
    result = plan(TINY, 12.0, p95_goal_s=2.0)
    assert result.meets_goal
    assert result.predicted_p95_s <= 2.0
    assert result.utilization <= MAX_UTILIZATION
    assert result.predicted_throughput == pytest.approx(12.0, rel=0.05)
    assert f"{result.workers} workers" in result.to_markdown()


def test_plan_gives_more_workers_for_a_higher_rate():
    """Quadrupling the rate at the same goal needs more workers."""
    low = plan(TINY, 3.0, p95_goal_s=2.0)
    high = plan(TINY, 12.0, p95_goal_s=2.0)
    assert low.meets_goal and high.meets_goal
    assert high.workers > low.workers


def test_plan_flags_a_goal_under_the_latency_floor():
    """A goal faster than one image on an idle model cannot be met; plan() says so."""
    result = plan(TINY, 3.0, p95_goal_s=0.9 * TINY.seconds(1))
    assert not result.meets_goal
    assert "MISSES" in result.to_markdown()
