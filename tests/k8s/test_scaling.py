"""The target backlog per worker: what `fleet bench plan` recommends, and what the
autoscaling manifests use (docs/KUBERNETES.md, "How scaling decides")."""

from __future__ import annotations

import pytest

from fleet.bench.cli import add_parser
from fleet.bench.planner import Profile, plan, simulate
from workers.batcher import BatchPolicy

A100 = Profile.load("sd15-a100-512")


def test_plan_gives_the_backlog_per_worker_by_littles_law():
    """Jobs in the system = arrival rate x mean time in it (Little's law), shared by the
    planned workers: the target that keeps that many workers at that rate."""
    result = plan(A100, 5, 20, jobs=600)
    policy = BatchPolicy(result.max_batch_images, result.max_wait_ms / 1000, result.policy)
    replay = simulate(A100, 5, policy, result.workers, jobs=600)
    assert result.backlog_per_worker == pytest.approx(5 * replay.mean / result.workers)
    assert 0 < result.backlog_per_worker < 2 * result.max_batch_images, (
        "at 76% of capacity a worker's reservation is not full"
    )
    text = result.scaling_markdown()
    assert f"target {result.backlog_per_worker:.3g} jobs per worker" in text
    assert f"{2 * result.max_batch_images} (twice the max batch)" in text


def test_bench_plan_prints_the_scaling_target(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "plan", "--profile", "sd15-h100-512", "--rate", "3", "--p95", "10"])
    assert args.func(args) == 0
    assert "scale on the backlog (queued + running jobs): target" in capsys.readouterr().out
