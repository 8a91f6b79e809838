"""The load generator: drives the real HTTP API and follows every job to its end.

Open loop (``rate``): jobs are sent at Poisson arrival times, whatever the fleet does —
the honest way to see queueing, since a slow fleet cannot slow the arrivals down.
Closed loop (``concurrency``): that many clients each send a job, wait for it, send the
next — the way to measure throughput at saturation. Both stop at ``jobs`` sent or
``duration_s`` elapsed, whichever comes first, then wait for what is in flight.

Jobs are followed through the job store (one pipelined Redis round trip per poll, so the
client does not steal the model's cores) or, without Redis access, through
``GET /v1/jobs/<id>``.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import redis
import requests
from tqdm import tqdm

from fleet.bench.mix import RequestMix
from tasks.jobs import Job, JobState
from tasks.store import JobStore
from tasks.views import JobView

POLL_S = 0.02


def api_session() -> requests.Session:
    """HTTP calls to the API with this host's key (``FLEET_API_KEY``)."""
    from tasks.settings import get_settings

    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {get_settings().api_key}"
    return session


@dataclass(frozen=True)
class LoadSpec:
    rate: float | None = None  # jobs/s, open loop
    concurrency: int | None = None  # clients, closed loop
    jobs: int = 200
    duration_s: float = 600.0
    seed: int = 0

    def __post_init__(self):
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("give a rate (open loop) or a concurrency (closed loop)")

    @property
    def label(self) -> str:
        return f"open {self.rate:g} jobs/s" if self.rate is not None else f"closed x{self.concurrency}"


@dataclass
class Sent:
    """One job as the client saw it."""

    job_id: str | None
    sent_at: float  # client clock (time.time)
    accepted_at: float | None = None
    seen_done_at: float | None = None
    status: int = 0
    error: str = ""
    job: Job | None = None


@dataclass
class LoadRun:
    spec: LoadSpec
    sent: list[Sent] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0


class JobTracker:
    """Which jobs have finished, noticed as soon as possible without loading the fleet."""

    def __init__(self, api_url: str, redis_url: str | None):
        self._api = api_url
        self._store = JobStore(redis.Redis.from_url(redis_url), ttl_s=3600) if redis_url else None
        self._session = api_session()

    def finished(self, job_ids: list[str]) -> list[str]:
        if not job_ids:
            return []
        if self._store is not None:
            return [i for i, state in self._store.states(job_ids).items() if state is None or state.terminal]
        done = []
        for job_id in job_ids:
            state = self._session.get(f"{self._api}/v1/jobs/{job_id}", timeout=30).json().get("state")
            if state not in (JobState.QUEUED.value, JobState.RUNNING.value):
                done.append(job_id)
        return done

    def record(self, job_id: str) -> Job | None:
        if self._store is not None:
            return self._store.get(job_id)
        return _job_from_view(self._session.get(f"{self._api}/v1/jobs/{job_id}", timeout=30).json())


def run_load(api_url: str, mix: RequestMix, spec: LoadSpec, redis_url: str | None = None) -> LoadRun:
    run = LoadRun(spec)
    tracker = JobTracker(api_url, redis_url)
    rng = random.Random(spec.seed)
    lock = threading.Lock()
    pending: dict[str, Sent] = {}
    stop_sending = threading.Event()
    all_sent = threading.Event()
    session = api_session()
    bar = tqdm(total=spec.jobs, desc=spec.label, unit="job", leave=False)

    def send(body: dict) -> Sent:
        sent = Sent(None, time.time())
        try:
            response = session.post(f"{api_url}/v1/jobs", json=body, timeout=30)
            sent.status = response.status_code
            if response.status_code == 202:
                sent.job_id = response.json()["id"]
                sent.accepted_at = time.time()
            else:
                sent.error = response.json().get("error", {}).get("message", response.text)[:200]
        except requests.RequestException as exc:
            sent.error = str(exc)[:200]
        with lock:
            run.sent.append(sent)
            if sent.job_id:
                pending[sent.job_id] = sent
            else:
                bar.update()
        return sent

    def wait_done(sent: Sent) -> None:
        while sent.job_id and sent.seen_done_at is None and not stop_sending.is_set():
            time.sleep(POLL_S)

    def poll() -> None:
        # Until every job is seen done, or the run gave up waiting (its fleet may be gone).
        while not (all_sent.is_set() and not pending) and not stop_sending.is_set():
            time.sleep(POLL_S)
            with lock:
                ids = list(pending)
            now = time.time()
            for job_id in tracker.finished(ids):
                with lock:
                    sent = pending.pop(job_id)
                sent.seen_done_at = now
                bar.update()

    run.started = time.time()
    deadline = time.monotonic() + spec.duration_s
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    bodies = (mix.sample(rng, seed) for seed in range(spec.jobs))
    if spec.rate is not None:
        # Sender threads so that one slow POST never delays the next arrival.
        with ThreadPoolExecutor(max_workers=8) as senders:
            next_at = time.monotonic()
            for body in bodies:
                if time.monotonic() > deadline:
                    break
                next_at += rng.expovariate(spec.rate)
                time.sleep(max(0.0, next_at - time.monotonic()))
                senders.submit(send, body)
    else:
        body_lock = threading.Lock()

        def client() -> None:
            while time.monotonic() < deadline:
                with body_lock:
                    body = next(bodies, None)
                if body is None:
                    return
                wait_done(send(body))

        clients = [threading.Thread(target=client) for _ in range(spec.concurrency)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
    all_sent.set()
    poller.join(timeout=max(60.0, spec.duration_s))
    stop_sending.set()
    bar.close()
    for sent in run.sent:
        if sent.job_id:
            sent.job = tracker.record(sent.job_id)
    run.finished = time.time()
    return run


def _job_from_view(view: dict) -> Job | None:
    """A job record rebuilt from the API's view of it (when Redis is out of reach)."""
    return JobView.model_validate(view).to_job() if "id" in view else None
