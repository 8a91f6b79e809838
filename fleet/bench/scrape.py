"""The fleet's metrics over a benchmark run, as Prometheus would have seen them.

``fleet bench scrape`` starts a private fleet (one worker, the API under gunicorn), drives
it with open-loop load, and meanwhile scrapes the API's and the worker's ``/metrics``
every second, keeping each answer as it came (Prometheus text, gzipped JSON lines). The
plot is drawn from those scrapes alone, the way the Grafana dashboard
(docs/grafana/fleet.json) draws from Prometheus: rates from counter deltas, p95s from
histogram bucket deltas over a window (``histogram_quantile``'s interpolation).

    fleet bench scrape --rate 6 --duration 25 --scrapes docs/bench/metrics-scrapes.jsonl.gz --plot docs/img/metrics.png
    fleet bench plot-metrics docs/bench/metrics-scrapes.jsonl.gz --plot docs/img/metrics.png
"""

from __future__ import annotations

import gzip
import json
import math
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

Sample = tuple[str, frozenset]

#: The stages a job's time goes to, by the histogram that measures each.
STAGES = {
    "queue wait": "fleet_queue_wait_seconds",
    "batch wait": "fleet_batch_wait_seconds",
    "model call": "fleet_inference_seconds",
    "upload": "fleet_upload_seconds",
    "job total": "fleet_job_seconds",
}


@dataclass
class Scrape:
    """One round: each target's answer (None when it did not answer) at ``t``."""

    t: float
    texts: dict[str, str | None]

    def to_json(self) -> str:
        return json.dumps({"t": self.t, "texts": self.texts})

    @classmethod
    def from_json(cls, line: str) -> Scrape:
        data = json.loads(line)
        return cls(data["t"], data["texts"])


class Scraper:
    """Scrapes every target every ``interval_s`` on a thread of its own, as Prometheus does."""

    def __init__(self, targets: dict[str, str], interval_s: float = 1.0):
        self.targets = targets
        self.interval_s = interval_s
        self.scrapes: list[Scrape] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scraper", daemon=True)
        self._session = requests.Session()

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    def scrape_once(self) -> Scrape:
        texts: dict[str, str | None] = {}
        for name, url in self.targets.items():
            try:
                response = self._session.get(url, timeout=max(0.5, self.interval_s))
                texts[name] = response.text if response.ok else None
            except requests.RequestException:
                texts[name] = None
        return Scrape(time.time(), texts)

    def _loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.scrapes.append(self.scrape_once())
            next_at += self.interval_s
            self._stop.wait(max(0.0, next_at - time.monotonic()))


def save(scrapes: list[Scrape], path: Path, title: str) -> None:
    """Gzipped JSON lines: a header with the run's title, then one line per round."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as out:
        out.write(json.dumps({"title": title}) + "\n")
        for scrape in scrapes:
            out.write(scrape.to_json() + "\n")


def load(path: Path) -> tuple[str, list[Scrape]]:
    """The run's title and its scrapes."""
    with gzip.open(path, "rt") as lines:
        header, *rest = [line for line in lines if line.strip()]
    return json.loads(header)["title"], [Scrape.from_json(line) for line in rest]


# -- reading scrapes as Prometheus would ---------------------------------------------------
@dataclass
class Round:
    """One scrape round, parsed: every sample of every target that answered, and which did."""

    t: float
    samples: dict[str, dict[Sample, float]] = field(default_factory=dict)

    def total(self, name: str, **labels: str) -> float | None:
        """The sum over targets and other labels of ``name``'s samples matching ``labels``;
        None when there is none (its target did not answer: a gap, as in Prometheus)."""
        wanted = set(labels.items())
        values = [
            value
            for samples in self.samples.values()
            for (sample, sample_labels), value in samples.items()
            if sample == name and wanted <= sample_labels
        ]
        return sum(values) if values else None

    def buckets(self, histogram: str) -> dict[float, float]:
        """Cumulative counts by upper bound, summed over targets and labels."""
        counts: dict[float, float] = {}
        for samples in self.samples.values():
            for (sample, labels), value in samples.items():
                if sample == f"{histogram}_bucket":
                    le = float(dict(labels)["le"])
                    counts[le] = counts.get(le, 0.0) + value
        return counts

    def label_values(self, name: str, label: str) -> set[str]:
        return {
            dict(labels)[label]
            for samples in self.samples.values()
            for (sample, labels), _ in samples.items()
            if sample == name and label in dict(labels)
        }

    def count(self, name: str) -> int:
        """Series of ``name`` (e.g. workers: ``fleet_worker_info``)."""
        return sum(1 for samples in self.samples.values() for sample, _ in samples if sample == name)


def parse(scrapes: Iterable[Scrape]) -> list[Round]:
    rounds = []
    for scrape in scrapes:
        parsed = Round(scrape.t)
        for target, text in scrape.texts.items():
            if text is None:
                continue
            parsed.samples[target] = {
                (s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }
        rounds.append(parsed)
    return rounds


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus's ``histogram_quantile`` on cumulative ``buckets``: linear within the
    bucket the rank falls in; the highest finite bound if it falls in ``+Inf``."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def delta(later: dict[float, float], earlier: dict[float, float]) -> dict[float, float]:
    return {le: max(0.0, count - earlier.get(le, 0.0)) for le, count in later.items()}


@dataclass
class Series:
    t: list[float] = field(default_factory=list)  # seconds since the first scrape
    values: dict[str, list[float | None]] = field(default_factory=dict)

    def add(self, t: float, **values: float | None) -> None:
        """One point of each line; a line that starts later (or skips a point: its target
        did not answer) has None there."""
        for name in values:
            self.values.setdefault(name, [None] * len(self.t))
        self.t.append(t)
        for name, line in self.values.items():
            line.append(values.get(name))


def series(rounds: list[Round], rate_window_s: float = 5.0, quantile_window_s: float = 10.0) -> dict[str, Series]:
    """What the dashboard's panels show, at each scrape."""
    start = rounds[0].t
    out = {name: Series() for name in ("throughput", "p95", "backlog", "batch")}
    for i, now in enumerate(rounds):
        t = now.t - start
        rate_from = _window_start(rounds, i, rate_window_s)
        span = now.t - rate_from.t
        if span > 0:
            out["throughput"].add(
                t,
                **{
                    "images/s": _rate(now, rate_from, "fleet_images_total"),
                    "jobs/s succeeded": _rate(now, rate_from, "fleet_jobs_total", state="SUCCEEDED"),
                    "jobs/s accepted": _rate(now, rate_from, "fleet_api_jobs_accepted_total"),
                },
            )
            batches = _rate(now, rate_from, "fleet_batch_images_count")
            images = _rate(now, rate_from, "fleet_batch_images_sum")
            out["batch"].add(t, **{"mean batch size": images / batches if batches and images is not None else None})
        quantile_from = _window_start(rounds, i, quantile_window_s)
        if now.t > quantile_from.t:
            out["p95"].add(
                t,
                **{
                    stage: histogram_quantile(0.95, delta(now.buckets(metric), quantile_from.buckets(metric)))
                    for stage, metric in STAGES.items()
                },
            )
        queues = sorted(now.label_values("fleet_backlog", "queue"))
        out["backlog"].add(
            t,
            workers=now.count("fleet_worker_info"),
            **{f"backlog {queue}": now.total("fleet_backlog", queue=queue) for queue in queues},
        )
    return out


def _rate(now: Round, earlier: Round, name: str, **labels: str) -> float | None:
    """Per second between two rounds; None where either lacks the counter (a gap)."""
    later, before = now.total(name, **labels), earlier.total(name, **labels)
    return None if later is None or before is None else (later - before) / (now.t - earlier.t)


def _window_start(rounds: list[Round], i: int, window_s: float) -> Round:
    """The earliest round within ``window_s`` before round ``i`` (a range vector's first)."""
    j = i
    while j > 0 and rounds[i].t - rounds[j - 1].t <= window_s + 1e-6:
        j -= 1
    return rounds[j]


def batch_sizes(rounds: list[Round]) -> dict[float, float]:
    """Model calls of the run by batch-size bucket (not cumulative)."""
    answered = [r.buckets("fleet_batch_images") for r in rounds if r.buckets("fleet_batch_images")]
    if not answered:
        return {}
    cumulative = delta(answered[-1], answered[0])
    bounds, below, calls = sorted(cumulative), 0.0, {}
    for bound in bounds:
        calls[bound] = cumulative[bound] - below
        below = cumulative[bound]
    while len(calls) > 1 and calls[max(calls)] == 0:  # no empty buckets above the largest batch
        del calls[max(calls)]
    return calls


def plot(scrapes: list[Scrape], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = parse(scrapes)
    lines = series(rounds)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), dpi=100)
    (throughput, p95), (sizes, backlog) = axes

    def draw(ax, data: Series, **style) -> None:
        for name, values in data.values.items():
            points = [(t, v) for t, v in zip(data.t, values, strict=True) if v is not None]
            if points:
                ax.plot(*zip(*points, strict=True), label=name, **style)

    draw(throughput, lines["throughput"])
    throughput.set(title="Throughput (rate over 5 s)", xlabel="seconds", ylabel="per second")
    draw(p95, lines["p95"], marker=".", markersize=3)
    p95.set(title="p95 by stage (over 10 s)", xlabel="seconds", ylabel="seconds", yscale="log")

    calls = batch_sizes(rounds)
    labels = [f"≤{bound:g}" if not math.isinf(bound) else "more" for bound in calls]
    sizes.bar(labels, list(calls.values()), color="tab:purple")
    total_calls = sum(calls.values())
    sums = [s for s in (r.total("fleet_batch_images_sum") for r in rounds) if s is not None]
    images = sums[-1] - sums[0] if sums else 0
    mean = f", mean {images / total_calls:.1f} images" if total_calls else ""
    sizes.set(title=f"Batch sizes: {total_calls:.0f} model calls{mean}", xlabel="images per call", ylabel="calls")

    backlog_data = lines["backlog"]
    workers = backlog_data.values.pop("workers", [])
    draw(backlog, backlog_data)
    backlog.set(title="Backlog (queued + running) against workers", xlabel="seconds", ylabel="jobs")
    twin = backlog.twinx()
    twin.step(backlog_data.t, workers, where="post", color="black", linestyle="--", label="workers")
    twin.set_ylabel("workers")
    twin.set_ylim(0, max([1.0, *(w for w in workers if w is not None)]) + 1)
    twin.yaxis.set_major_locator(MaxNLocator(integer=True))
    handles, names = backlog.get_legend_handles_labels()
    more, more_names = twin.get_legend_handles_labels()
    backlog.legend(handles + more, names + more_names, fontsize=8, loc="upper right")
    for ax in (throughput, p95):
        ax.legend(fontsize=8)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# -- a run ---------------------------------------------------------------------------------
def run(model: str, mix_name: str, rate: float, duration_s: float, scrapes_path: Path | None, plot_path: Path | None,
        interval_s: float = 1.0, tail_s: float = 3.0) -> list[Scrape]:  # fmt: skip
    """A private fleet (one worker) under ``rate`` jobs/s for ``duration_s``, scraped every
    ``interval_s`` until its jobs are done and ``tail_s`` more."""
    from fleet.bench.fleetrun import FleetConfig, running_fleet
    from fleet.bench.load import LoadSpec, run_load
    from fleet.bench.mix import RequestMix
    from fleet.processes import free_port

    mix = RequestMix.load(mix_name)
    config = FleetConfig(8, 100, "adaptive")
    worker_port = free_port()
    with tempfile.TemporaryDirectory(prefix="fleet-scrape-") as tmp, running_fleet(
        model, config, Path(tmp), FLEET_WORKER_METRICS_PORT=str(worker_port)
    ) as fleet:  # fmt: skip
        targets = {"api": f"{fleet.api_url}/metrics", "worker0": f"http://127.0.0.1:{worker_port}/metrics"}
        with Scraper(targets, interval_s) as scraper:
            time.sleep(2 * interval_s)  # the idle fleet first
            spec = LoadSpec(rate=rate, jobs=int(rate * duration_s) + 1, duration_s=duration_s)
            load_run = run_load(fleet.api_url, mix, spec)
            time.sleep(tail_s)
        scrapes = scraper.scrapes
    title = (f"{len(load_run.sent)} jobs of mix '{mix_name}' at {rate:g} jobs/s (open loop) for {duration_s:g} s, "
             f"one worker ({config.label}), model {Path(model).name}, {time.strftime('%Y-%m-%d')}")  # fmt: skip
    if scrapes_path is not None:
        save(scrapes, scrapes_path, title)
    if plot_path is not None:
        plot(scrapes, plot_path, title)
    return scrapes
