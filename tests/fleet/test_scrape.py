"""The metrics plot reads scrapes as Prometheus would: rates from counter deltas, p95s by
histogram_quantile over a window, batch sizes from bucket deltas, backlog against workers;
the raw scrapes round-trip through their file."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from fleet.bench.scrape import Scrape, batch_sizes, histogram_quantile, load, parse, plot, save, series
from workers.metrics import WorkerMetrics


def test_histogram_quantile_interpolates_as_prometheus_does():
    buckets = {0.1: 0.0, 0.5: 50.0, 1.0: 100.0, float("inf"): 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.5)
    assert histogram_quantile(0.95, buckets) == pytest.approx(0.95)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.3)
    assert histogram_quantile(0.99, {1.0: 0.0, float("inf"): 10.0}) == 1.0, "+Inf: the highest finite bound"
    assert histogram_quantile(0.95, {1.0: 0.0, float("inf"): 0.0}) is None


class Backlog:
    def __init__(self, jobs: int):
        self.jobs = jobs

    def collect(self):
        family = GaugeMetricFamily("fleet_backlog", "", labels=["queue"])
        family.add_metric(["fleet.interactive"], self.jobs)
        yield family


def test_a_run_of_scrapes_becomes_the_plots_series(tmp_path):
    """Scrapes 2 s apart: idle; 8 images in one call of 8; 4 in two calls of 2; then the
    worker does not answer (a gap, not a drop to zero)."""
    worker, api = WorkerMetrics(), CollectorRegistry()
    backlog = Backlog(0)
    api.register(backlog)
    worker.started("tiny", ["fleet.interactive"])
    worker.jobs.labels("SUCCEEDED")

    def texts() -> dict[str, str | None]:
        return {"api": generate_latest(api).decode(), "worker0": generate_latest(worker.registry).decode()}

    scrapes = [Scrape(100.0, texts())]
    for at, calls, waiting in ((102.0, [8], 5), (104.0, [2, 2], 0)):
        for images in calls:
            worker.batch_done(images, 0.01, 0.5)
        worker.jobs.labels("SUCCEEDED").inc(len(calls))
        backlog.jobs = waiting
        scrapes.append(Scrape(at, texts()))
    scrapes.append(Scrape(106.0, {**texts(), "worker0": None}))

    rounds = parse(scrapes)
    lines = series(rounds, rate_window_s=2.0, quantile_window_s=4.0)
    assert lines["throughput"].values["images/s"] == [pytest.approx(4.0), pytest.approx(2.0), None]
    assert lines["throughput"].values["jobs/s succeeded"] == [pytest.approx(0.5), pytest.approx(1.0), None]
    assert lines["batch"].values["mean batch size"] == [8, 2, None]
    assert lines["backlog"].values["workers"] == [1, 1, 1, 0]
    assert lines["backlog"].values["backlog fleet.interactive"] == [0, 5, 0, 0]
    assert 0.25 < lines["p95"].values["model call"][1] <= 0.5
    assert batch_sizes(rounds) == {1: 0, 2: 2, 3: 0, 4: 0, 6: 0, 8: 1}

    path = tmp_path / "scrapes.jsonl.gz"
    save(scrapes, path, "a run")
    title, again = load(path)
    assert title == "a run" and [s.texts for s in again] == [s.texts for s in scrapes]
    plot(again, tmp_path / "metrics.png", title)
    assert (tmp_path / "metrics.png").stat().st_size > 10_000
