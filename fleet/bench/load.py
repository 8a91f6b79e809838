"""The load generator: drives the real HTTP API and follows every job to its end.

Open loop (``rate``): jobs are sent at Poisson arrival times, whatever the fleet does —
the honest way to see queueing, since a slow fleet cannot slow the arrivals down.
Closed loop (``concurrency``): that many clients each send a job, wait for it, send the
next — the way to measure throughput at saturation. Both stop at ``jobs`` sent or
``duration_s`` elapsed, whichever comes first, then wait for what is in flight.

Jobs are followed as ``follow`` says (``fleet.bench.follow``): by default each client
waits, so that following costs the fleet one held request per job rather than CPU for
every poll. The closed-loop client submits with ``Prefer: wait`` (one request per job);
the open-loop one submits from a few sender threads, so that a slow answer never delays
the next arrival, and a thread per job in flight waits on it with ``GET ... Prefer: wait``.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import requests
from tqdm import tqdm

from fleet.bench.follow import Follow
from fleet.bench.mix import RequestMix
from fleet.client import FleetAPIError, FleetClient
from tasks.jobs import Job
from tasks.settings import ClientSettings
from tasks.views import JobView

SENDERS = 8


@dataclass(frozen=True)
class LoadSpec:
    rate: float | None = None  # jobs/s, open loop
    concurrency: int | None = None  # clients, closed loop
    jobs: int = 200
    duration_s: float = 600.0
    seed: int = 0
    follow: Follow = Follow()

    def __post_init__(self):
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("give a rate (open loop) or a concurrency (closed loop)")

    @property
    def label(self) -> str:
        loop = f"open {self.rate:g} jobs/s" if self.rate is not None else f"closed x{self.concurrency}"
        return loop if self.follow == Follow() else f"{loop}, client {self.follow.label}"

    @property
    def follow_timeout_s(self) -> float:
        """How long one job is followed before it counts as unfinished."""
        return max(60.0, self.duration_s)


@dataclass
class Sent:
    """One job as the client saw it."""

    job_id: str | None
    sent_at: float  # client clock (time.time)
    seen_done_at: float | None = None
    status: int = 0  # of a refused submission
    error: str = ""
    job: Job | None = None  # the job's record as its last view showed it


@dataclass
class LoadRun:
    spec: LoadSpec
    sent: list[Sent] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0


def run_load(api_url: str, mix: RequestMix, spec: LoadSpec) -> LoadRun:
    run = LoadRun(spec)
    rng = random.Random(spec.seed)
    lock = threading.Lock()
    bar = tqdm(total=spec.jobs, desc=spec.label, unit="job", leave=False)
    local = threading.local()
    clients: list[FleetClient] = []
    api_key = ClientSettings().api_key or None

    def client() -> FleetClient:
        """This thread's client: a requests session is not for sharing between threads."""
        if not hasattr(local, "client"):
            local.client = FleetClient(api_url, api_key, retries=0)  # a refusal is a result: count it
            with lock:
                clients.append(local.client)
        return local.client

    def send(body: dict, hold: bool) -> tuple[Sent, JobView | None]:
        """Submit (``hold``: as ``follow`` submits, which may hold the request until the
        job ends); a refusal is recorded and gives no job."""
        sent, job = Sent(None, time.time()), None
        try:
            job = spec.follow.submit(client(), body, spec.follow_timeout_s) if hold else client().submit(**body)
            sent.job_id = job.id
        except FleetAPIError as exc:
            sent.status, sent.error = exc.status, exc.message[:200]
        except requests.RequestException as exc:
            sent.error = str(exc)[:200]
        with lock:
            run.sent.append(sent)
        if job is None:
            bar.update()
        return sent, job

    def finish(sent: Sent, job: JobView) -> None:
        try:
            job = spec.follow.until_done(client(), job, spec.follow_timeout_s)
        except (FleetAPIError, requests.RequestException) as exc:
            sent.error = f"following the job: {exc}"[:200]
        if job.state.terminal:
            sent.seen_done_at = time.time()
        sent.job = job.to_job()
        bar.update()

    run.started = time.time()
    deadline = time.monotonic() + spec.duration_s
    bodies = (mix.sample(rng, seed) for seed in range(spec.jobs))
    if spec.rate is not None:
        # Threads are made as jobs go in flight and reused once idle: every job in flight
        # has a thread waiting on it, so none is noticed late.
        with ThreadPoolExecutor(max_workers=max(1, spec.jobs)) as followers:

            def send_and_follow(body: dict) -> None:
                sent, job = send(body, hold=False)
                if job is not None:
                    followers.submit(finish, sent, job)

            with ThreadPoolExecutor(max_workers=SENDERS) as senders:
                next_at = time.monotonic()
                for body in bodies:
                    if time.monotonic() > deadline:
                        break
                    next_at += rng.expovariate(spec.rate)
                    time.sleep(max(0.0, next_at - time.monotonic()))
                    senders.submit(send_and_follow, body)
    else:
        body_lock = threading.Lock()

        def closed_loop_client() -> None:
            while time.monotonic() < deadline:
                with body_lock:
                    body = next(bodies, None)
                if body is None:
                    return
                sent, job = send(body, hold=True)
                if job is not None:
                    finish(sent, job)

        threads = [threading.Thread(target=closed_loop_client) for _ in range(spec.concurrency or 0)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    bar.close()
    for c in clients:
        c.close()
    run.finished = time.time()
    return run
