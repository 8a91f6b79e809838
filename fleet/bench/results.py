"""What a load run measured: percentiles of every phase, throughput, batch sizes, errors;
as a dict (written as JSON) and as a Markdown table."""

from __future__ import annotations

import collections
import statistics
from dataclasses import dataclass

from fleet.bench.load import LoadRun
from fleet.bench.stats import percentile
from tasks.jobs import Job, JobState

PERCENTILES = (50, 90, 95, 99)
PHASES = ("queue_wait", "batch_wait", "inference", "upload", "overhead", "end_to_end", "client_end_to_end")


@dataclass
class Summary:
    label: str
    jobs_sent: int
    jobs_succeeded: int
    errors: dict[str, int]
    images: int
    window_s: float
    phases: dict[str, dict[str, float]]  # phase -> {"p50": seconds, ...}
    batch_sizes: dict[int, int]  # images per model call -> calls
    call_seconds: dict[int, float]  # images per model call -> mean duration of such calls
    steady_images_per_s: float  # after the ramp-up, in whole model calls (``_steady_rate``)
    first_call_s: float = float("nan")  # the run's first model call: did it pay for initialisation?

    @property
    def images_per_s(self) -> float:
        return self.images / self.window_s if self.window_s else 0.0

    @property
    def jobs_per_s(self) -> float:
        return self.jobs_succeeded / self.window_s if self.window_s else 0.0

    @property
    def mean_batch(self) -> float:
        calls = sum(self.batch_sizes.values())
        return sum(k * v for k, v in self.batch_sizes.items()) / calls if calls else 0.0

    def p(self, phase: str, pct: int = 95) -> float:
        return self.phases[phase][f"p{pct}"]

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "jobs_sent": self.jobs_sent,
            "jobs_succeeded": self.jobs_succeeded,
            "errors": self.errors,
            "images": self.images,
            "window_s": self.window_s,
            "images_per_s": self.images_per_s,
            "steady_images_per_s": self.steady_images_per_s,
            "first_call_s": self.first_call_s,
            "jobs_per_s": self.jobs_per_s,
            "mean_batch_images": self.mean_batch,
            "batch_sizes": self.batch_sizes,
            "call_seconds": self.call_seconds,
            "phases": self.phases,
        }

    def to_markdown(self) -> str:
        lines = [
            f"**{self.label}**: {self.jobs_succeeded}/{self.jobs_sent} jobs, {self.images} images in "
            f"{self.window_s:.1f} s = **{self.images_per_s:.2f} images/s** ({self.jobs_per_s:.2f} jobs/s); "
            f"mean batch {self.mean_batch:.2f}; errors {sum(self.errors.values())}",
            "",
            "| phase | " + " | ".join(f"p{p}" for p in PERCENTILES) + " |",
            "|---|" + "---|" * len(PERCENTILES),
        ]
        for phase in PHASES:
            values = self.phases[phase]
            lines.append(f"| {phase} | " + " | ".join(f"{values[f'p{p}'] * 1000:.0f} ms" for p in PERCENTILES) + " |")
        sizes = ", ".join(f"{k}: {v}" for k, v in sorted(self.batch_sizes.items()))
        lines += ["", f"batch sizes (images: calls): {sizes}"]
        return "\n".join(lines)


def summarize(run: LoadRun) -> Summary:
    done = [(s, s.job) for s in run.sent if s.job is not None and s.job.state is JobState.SUCCEEDED]
    succeeded = {id(s) for s, _ in done}
    errors = collections.Counter(
        s.error or f"HTTP {s.status}" if not s.job_id else f"job {s.job.state.value}" if s.job else "job missing"
        for s in run.sent
        if id(s) not in succeeded
    )
    samples: dict[str, list[float]] = {phase: [] for phase in PHASES}
    for s, job in done:
        t = job.timings
        end_to_end = (job.finished_at or job.created_at) - job.created_at
        samples["queue_wait"].append(t.queue_wait_s or 0.0)
        samples["batch_wait"].append(t.batch_wait_s or 0.0)
        samples["inference"].append(t.inference_s or 0.0)
        samples["upload"].append(t.upload_s or 0.0)
        samples["end_to_end"].append(end_to_end)
        samples["overhead"].append(end_to_end - (t.inference_s or 0.0))  # everything but the model
        if s.seen_done_at:
            samples["client_end_to_end"].append(s.seen_done_at - s.sent_at)
    phases = {phase: {f"p{p}": percentile(values, p) for p in PERCENTILES} for phase, values in samples.items()}
    for phase, values in samples.items():
        phases[phase]["mean"] = statistics.fmean(values) if values else float("nan")
    calls = {job.batch.id: job.batch.images for _, job in done if job.batch}
    # A one-slice job's inference time is its call's duration: the batch-cost profile the
    # model showed inside the fleet (to set beside the bare one).
    durations: dict[int, list[float]] = collections.defaultdict(list)
    seen: set[str] = set()
    for _, job in done:
        if job.batch and job.batch.id not in seen and job.spec.num_images <= job.batch.images:
            seen.add(job.batch.id)
            durations[job.batch.images].append(job.timings.inference_s or 0.0)
    if done:
        window = max(job.finished_at or job.created_at for _, job in done) - min(job.created_at for _, job in done)
    else:
        window = 0.0
    return Summary(
        label=run.spec.label,
        jobs_sent=len(run.sent),
        jobs_succeeded=len(done),
        errors=dict(errors),
        images=sum(len(job.image_keys) for _, job in done),
        window_s=window,
        phases=phases,
        batch_sizes=dict(sorted(collections.Counter(calls.values()).items())),
        call_seconds={n: statistics.fmean(v) for n, v in sorted(durations.items())},
        steady_images_per_s=_steady_rate([job for _, job in done]),
        first_call_s=_first_call([job for _, job in done]),
    )


def _first_call(jobs: list[Job]) -> float:
    """The duration of the run's first model call (the job whose call started first)."""
    timed = [(job.started_at, job.timings.batch_wait_s or 0.0, job.timings.inference_s) for job in jobs]
    starts = [(started + wait, inference) for started, wait, inference in timed if started and inference is not None]
    return min(starts)[1] if starts else float("nan")


def _steady_rate(jobs: list[Job]) -> float:
    """Images/s once the run is under way, counted in whole model calls: the first quarter
    of the calls (the ramp-up: an idle worker starts the first arrivals in small batches)
    is left out, and the rate is the images of the remaining calls over the time from the
    end of the last left-out call to the end of the last call. Counting whole calls matters:
    a batch's images all finish together, so a window cut through calls miscounts them."""
    calls: dict[str, list[Job]] = collections.defaultdict(list)
    for job in jobs:
        if job.batch:
            calls[job.batch.id].append(job)
    ends = sorted(
        (max(job.finished_at or job.created_at for job in call), sum(len(job.image_keys) for job in call))
        for call in calls.values()
    )
    skip = max(1, -(-len(ends) // 4))
    if len(ends) <= skip:
        return float("nan")
    span = ends[-1][0] - ends[skip - 1][0]
    return sum(images for _, images in ends[skip:]) / span if span > 0 else float("nan")
