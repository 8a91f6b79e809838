"""The benchmark tool: mixes, percentiles and summaries (pure), a real load run against
the test fleet in both loop modes and every way of following jobs, and the status-read
benchmark on a fleet of its own."""

from __future__ import annotations

import json
import random

import pytest

from fleet.bench.fleetrun import FleetConfig
from fleet.bench.follow import Follow
from fleet.bench.load import LoadSpec, run_load
from fleet.bench.mix import RequestMix
from fleet.bench.results import percentile, summarize
from fleet.bench.sweep import Point, markdown_table, plot


def test_percentiles_interpolate_like_numpy():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 95) == pytest.approx(95.05)
    assert percentile([3.0], 99) == 3.0


def test_the_shipped_mixes_load_and_sample_by_weight():
    mix = RequestMix.load("default")
    rng = random.Random(1)
    bodies = [mix.sample(rng, seed) for seed in range(2000)]
    small = sum(1 for b in bodies if (b["width"], b["height"], b["num_images"]) == (64, 64, 1))
    assert 0.4 < small / len(bodies) < 0.6  # weight 5 of 10
    assert all(b["prompt"] and b["seed"] == i for i, b in enumerate(bodies))
    assert RequestMix.load("reference-128").shapes[0].width == 128
    assert mix.mean_images == pytest.approx(1.2)


def test_a_mix_file_needs_positive_weights(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"requests": [{"weight": 0, "width": 64, "height": 64, "steps": 4}]}))
    with pytest.raises(ValueError):
        RequestMix.load(str(path))


def test_a_load_is_open_or_closed_loop_not_both():
    with pytest.raises(ValueError):
        LoadSpec(rate=1, concurrency=2)
    with pytest.raises(ValueError):
        LoadSpec()
    assert LoadSpec(rate=2.5).label == "open 2.5 jobs/s" and LoadSpec(concurrency=4).label == "closed x4"
    polling = LoadSpec(concurrency=4, follow=Follow.parse("poll:0.025"))
    assert polling.label == "closed x4, client polls every 25 ms"


def test_ways_of_following_parse_from_the_command_line():
    assert Follow.parse("wait") == Follow() and Follow.parse("stream") == Follow("stream")
    assert Follow.parse("poll:0.5") == Follow("poll", 0.5) and str(Follow("poll", 0.5)) == "poll:0.5"
    for bad in ("poll", "poll:0", "poll:soon", "wait:3", "sleep"):
        with pytest.raises(ValueError):
            Follow.parse(bad)


def test_configs_parse_from_the_command_line():
    assert FleetConfig.parse("8:50:adaptive:4") == FleetConfig(8, 50, "adaptive", 4)
    assert FleetConfig.parse("1:0") == FleetConfig(1, 0, "fixed", 1)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "spec",
    [
        LoadSpec(rate=8, jobs=10),
        LoadSpec(concurrency=4, jobs=10),
        LoadSpec(rate=8, jobs=10, follow=Follow("stream")),
        LoadSpec(concurrency=4, jobs=10, follow=Follow("poll", 0.1)),
    ],
    ids=["open-wait", "closed-wait", "open-stream", "closed-poll"],
)
def test_a_load_run_against_the_fleet_reports_every_phase(api_url, spec, tmp_path):
    mix = RequestMix.load("reference-64")
    run = run_load(api_url, mix, spec)
    summary = summarize(run)
    assert summary.jobs_sent == summary.jobs_succeeded == 10 and not summary.errors
    assert summary.images == 10 and summary.images_per_s > 0
    for phase in ("queue_wait", "inference", "upload", "end_to_end", "client_end_to_end"):
        assert 0 <= summary.p(phase, 50) <= summary.p(phase, 99)
    assert summary.p("client_end_to_end", 50) >= summary.p("inference", 50)
    assert sum(summary.batch_sizes.values()) >= 1
    assert "p95" in summary.to_markdown()

    point = Point(FleetConfig(), spec, summary, {"api": 0.5})
    assert spec.label in markdown_table([point])
    assert point.cpu_ms_per_image("api") == pytest.approx(50.0)  # 0.5 s over 10 images
    plot([point.to_dict()], tmp_path / "curve.png", "test")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.e2e
def test_the_status_read_benchmark_reports_cpu_per_read(tmp_path):
    from fleet.bench.reads import run

    table = run(reads=30, out=tmp_path / "reads.json")
    rows = json.loads((tmp_path / "reads.json").read_text())["rows"]
    assert [r["what"] for r in rows][:2] == ["QUEUED job", "SUCCEEDED job, 1 image"]
    assert all(r["reads"] == 30 and r["wall_ms_per_read"] > 0 for r in rows)
    assert "API CPU per read" in table and (tmp_path / "reads.md").exists()


def test_the_steady_rate_counts_whole_calls_after_the_ramp():
    """Calls of 8 every second after two small ramp-up calls: 8 images/s, whatever the ramp."""
    from fleet.bench.results import _steady_rate
    from tasks.jobs import BatchInfo, Job, JobState, parse_request
    from tasks.settings import Settings

    spec = parse_request({"prompt": "p"}, Settings())

    def job(call: str, finished: float) -> Job:
        return Job(
            "0" * 32, JobState.SUCCEEDED, spec, 0.0, finished_at=finished, image_keys=["k"], batch=BatchInfo(call, 8)
        )

    done = [job("ramp-a", 0.5), job("ramp-b", 1.07)]
    done += [job(f"c{n}", 2.0 + n + i * 0.01) for n in range(6) for i in range(8)]
    assert _steady_rate(done) == pytest.approx(8.0, rel=0.02)


def test_the_queueing_model_lets_a_job_join_a_running_batch_only_step_by_step():
    from fleet.bench.steps import predict

    jobs = [(0.0, 20), (0.52, 20), (0.61, 10)]  # a call takes 1 s at any size (a=0, b=1): a step 50 ms
    request = predict("request", 0.0, 1.0, 20, jobs)
    step = predict("step", 0.0, 1.0, 20, jobs)
    assert request == pytest.approx([1.0, 1.48, 1.89]), "each waits for the call before it; 10 steps take half"
    assert step == pytest.approx([1.0, 1.03, 0.54]), "each joins at the next 50 ms boundary and runs its own steps"
