"""A burst of jobs against the running fleet, read back from the job records."""

from __future__ import annotations

import collections
import statistics
import time
from dataclasses import dataclass, field

import redis
import requests
from tqdm import tqdm

from tasks.jobs import Job
from tasks.store import JobStore


@dataclass
class BurstResult:
    jobs: list[Job]
    submit_s: float  # how long submitting the burst took

    @property
    def images(self) -> int:
        return sum(len(job.image_keys) for job in self.jobs)

    @property
    def span_s(self) -> float:
        """From the first submission to the last job finished."""
        return max(j.finished_at for j in self.jobs) - min(j.created_at for j in self.jobs)

    @property
    def images_per_s(self) -> float:
        return self.images / self.span_s

    @property
    def failed(self) -> int:
        return sum(1 for job in self.jobs if job.state.value != "SUCCEEDED")

    @property
    def batch_sizes(self) -> dict[int, int]:
        """Batch size -> number of model calls of that size."""
        calls = {job.batch["id"]: job.batch["images"] for job in self.jobs if job.batch}
        return dict(sorted(collections.Counter(calls.values()).items()))

    def mean(self, timing: str) -> float:
        return statistics.fmean(getattr(job.timings, timing) or 0.0 for job in self.jobs)

    extra: dict = field(default_factory=dict)


def run_burst(api_url: str, redis_url: str, bodies: list[dict], timeout_s: float = 600) -> BurstResult:
    """Submit every body as fast as one client can, then wait for every job to finish."""
    session = requests.Session()
    ids = []
    started = time.perf_counter()
    for body in bodies:
        response = session.post(f"{api_url}/v1/jobs", json=body, timeout=30)
        response.raise_for_status()
        ids.append(response.json()["id"])
    submit_s = time.perf_counter() - started

    store = JobStore(redis.Redis.from_url(redis_url), ttl_s=3600)
    deadline = time.monotonic() + timeout_s
    pending = set(ids)
    with tqdm(total=len(ids), desc="jobs", unit="job", leave=False) as bar:
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} jobs unfinished after {timeout_s}s")
            time.sleep(0.25)  # a light poll: the client must not steal the model's cores
            finished = {i for i, state in store.states(sorted(pending)).items() if state and state.terminal}
            pending -= finished
            bar.update(len(finished))
    return BurstResult([store.get(i) for i in ids], submit_s)
