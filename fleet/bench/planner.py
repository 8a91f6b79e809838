"""Capacity planner: how many workers, and which batching settings, keep p95 under a goal.

Pure Python, no torch, no servers: it predicts in seconds what a fleet would do, from a
model's batch-cost profile, by replaying the worker's own batcher in simulated time.

The model
    One model call of ``n`` images takes ``t(n) = a*n + b`` seconds: ``a`` per image,
    ``b`` per call (fixed overhead). Profiles ship in ``workers/profiles/*.json``
    (measured here, or fitted from published figures; each file says which), the same
    ones ``FLEET_MODEL=sim:profile=NAME`` runs.

    Jobs arrive as a Poisson process (open loop: clients do not wait for each other).
    Every job goes to the shared broker queue; a worker reserves it when it has a free
    reservation slot (``2 * max_batch_images`` jobs, the task threads the real worker
    runs with prefetch 1), and a slot stays taken until the job's last image is done.
    When several workers have room, the least loaded one (fewest images waiting or
    running; round robin among equals) gets it. The real broker hands a message to
    whichever consumer with prefetch credit left takes it first; least loaded is a simple
    stand-in that an idle, empty worker would win too. Each worker has its own
    ``workers.batcher.Batcher``, exactly the code a real worker's runner runs: when its
    model is free it calls ``next_batch(now)``; a batch keeps the model busy for
    ``t(images)`` and is then fed to the batcher's cost model; no batch means sleeping
    until ``wake_at`` or the next job it reserves.

    A job's latency is from its arrival at the broker to the end of the batch that
    finished its last image, plus ``overhead_s`` (HTTP, broker, upload, polling: fleet
    costs that do not occupy the model). The first 10% of jobs are warm-up and not counted.

Utilisation is throughput over the full-batch capacity of the configuration, not busy
time: see ``SimResult``. ``plan`` keeps it under ``MAX_UTILIZATION`` for headroom.

What it leaves out: noise in call times, jobs of mixed compat keys, deadlines, retries.
Measure the real fleet (``fleet bench batching``) before trusting a plan near its limits.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from dataclasses import dataclass

from fleet.bench.stats import percentile
from workers.batcher import Batch, Batcher, BatchPolicy, CostModel, Request
from workers.cost import CostProfile as Profile
from workers.work import BatchKey, CompatKey

WARMUP_FRACTION = 0.1
MAX_UTILIZATION = 0.85
# The adaptive policy recomputes its wake-up from the arrival rate at every call, so it
# could keep asking for one a hair later; a real dispatcher's sleep is not finer anyway.
MIN_SLEEP_S = 1e-3
KEY = BatchKey("planned", CompatKey("planned", 512, 512, 20, 7.5))  # every simulated job can share a batch


def saturation_throughput(profile: Profile, max_batch_images: int, workers: int = 1) -> float:
    """Images per second when every call is a full batch: the most a fleet can serve."""
    return workers * max_batch_images / profile.seconds(max_batch_images)


@dataclass(frozen=True)
class SimResult:
    latencies: tuple[float, ...]  # per counted job, seconds, sorted
    throughput_images_per_s: float
    mean_batch_images: float
    # Throughput over what the configuration serves at full batches. Not the time the
    # model is busy: a greedy batcher keeps the model busy nearly all the time even at
    # moderate load (batches shrink to what has arrived), so busy time says nothing
    # about headroom; this does.
    utilization: float
    busy_fraction: float  # time the models spend running, over workers x time

    @property
    def mean(self) -> float:
        return sum(self.latencies) / max(len(self.latencies), 1)

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 50)

    @property
    def p95(self) -> float:
        return percentile(self.latencies, 95)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 99)


class _MemoCostModel(CostModel):
    """The batcher's cost model, refitted only when a sample arrives: same answers, and the
    simulation asks far more often than it observes."""

    def __init__(self) -> None:
        super().__init__()
        self._fits: dict[CompatKey, tuple[float, float] | None] = {}

    def observe(self, key: CompatKey, images: int, seconds: float) -> None:
        super().observe(key, images, seconds)
        self._fits.pop(key, None)

    def coefficients(self, key: CompatKey) -> tuple[float, float] | None:
        if key not in self._fits:
            self._fits[key] = super().coefficients(key)
        return self._fits[key]


@dataclass(eq=False)
class _Worker:
    index: int
    batcher: Batcher
    running: Batch | None = None
    reserved: int = 0  # jobs holding a reservation slot
    load: int = 0  # images reserved and not yet done: what least-loaded dispatch compares
    wake_token: int = 0  # only the latest scheduled wake-up counts


_ARRIVAL, _DONE, _WAKE = 0, 1, 2


def simulate(
    profile: Profile,
    rate_jobs_per_s: float,
    policy: BatchPolicy,
    workers: int = 1,
    jobs: int = 2000,
    images_per_job: int = 1,
    seed: int = 0,
    overhead_s: float = 0.0,
    slots_per_worker: int | None = None,
) -> SimResult:
    """Replay ``jobs`` Poisson arrivals through ``workers`` workers; see the module docstring."""
    if rate_jobs_per_s <= 0 or workers < 1 or jobs < 10 or images_per_job < 1:
        raise ValueError("need a positive rate, one worker, ten jobs and one image per job at least")
    slots = slots_per_worker or 2 * policy.max_batch_images
    rng = random.Random(seed)
    fleet = [_Worker(i, Batcher(policy, _MemoCostModel())) for i in range(workers)]
    arrival = [0.0] * jobs
    remaining = [images_per_job] * jobs
    finish = [math.nan] * jobs
    batches: list[tuple[float, float, int]] = []  # start, end, images
    broker: deque[int] = deque()
    events: list[tuple[float, int, int, int, int]] = []  # time, seq, kind, worker, token
    seq = itertools.count()
    next_rr = 0

    def schedule(at: float, kind: int, worker: int = -1, token: int = 0) -> None:
        heapq.heappush(events, (at, next(seq), kind, worker, token))

    def dispatch(now: float) -> set[int]:
        nonlocal next_rr
        given: set[int] = set()
        while broker:
            free = [w for w in fleet if w.reserved < slots]
            if not free:
                break
            w = min(free, key=lambda w: (w.load, (w.index - next_rr) % workers))
            next_rr = (w.index + 1) % workers
            job = broker.popleft()
            w.batcher.add(Request(KEY, images_per_job, now, None, payload=job))
            w.reserved += 1
            w.load += images_per_job
            given.add(w.index)
        return given

    def poke(w: _Worker, now: float) -> None:
        if w.running is not None:
            return
        decision = w.batcher.next_batch(now)
        if decision.batch is not None:
            w.running = decision.batch
            end = now + profile.seconds(decision.batch.images)
            batches.append((now, end, decision.batch.images))
            schedule(end, _DONE, w.index)
        elif decision.wake_at is not None:
            w.wake_token += 1
            schedule(max(decision.wake_at, now + MIN_SLEEP_S), _WAKE, w.index, w.wake_token)

    arrived = 0
    schedule(rng.expovariate(rate_jobs_per_s), _ARRIVAL)
    while events:
        now, _, kind, index, token = heapq.heappop(events)
        touched: set[int] = set()
        if kind == _ARRIVAL:
            arrival[arrived] = now
            broker.append(arrived)
            arrived += 1
            if arrived < jobs:
                schedule(now + rng.expovariate(rate_jobs_per_s), _ARRIVAL)
        elif kind == _DONE:
            w = fleet[index]
            batch, w.running = w.running, None
            assert batch is not None
            w.batcher.cost_model.observe(KEY.compat, batch.images, profile.seconds(batch.images))
            w.load -= batch.images
            for s in batch.slices:
                job = s.request.payload
                remaining[job] -= s.count
                if remaining[job] == 0:
                    finish[job] = now
                    w.reserved -= 1
            touched.add(index)
        elif token == fleet[index].wake_token:
            touched.add(index)
        for i in sorted(touched | dispatch(now)):
            poke(fleet[i], now)

    return _result(profile, policy, workers, images_per_job, arrival, finish, batches, overhead_s)


def _result(
    profile: Profile,
    policy: BatchPolicy,
    workers: int,
    images_per_job: int,
    arrival: list[float],
    finish: list[float],
    batches: list[tuple[float, float, int]],
    overhead_s: float,
) -> SimResult:
    counted = range(int(len(arrival) * WARMUP_FRACTION), len(arrival))
    latencies = tuple(sorted(finish[j] - arrival[j] + overhead_s for j in counted))
    # Steady state: from the first counted arrival to the last completion, every image
    # finished in it (warm-up jobs still queued included) over its length.
    start, end = arrival[counted[0]], max(finish)
    span = max(end - start, 1e-9)
    done = sum(images_per_job for f in finish if f > start)
    busy = sum(max(0.0, e - max(s, start)) for s, e, _ in batches)
    counted_batches = [n for s, _, n in batches if s >= start]
    throughput = done / span
    return SimResult(
        latencies=latencies,
        throughput_images_per_s=throughput,
        mean_batch_images=sum(counted_batches) / max(len(counted_batches), 1),
        utilization=throughput / saturation_throughput(profile, policy.max_batch_images, workers),
        busy_fraction=busy / (span * workers),
    )


def ideal(
    profile: Profile,
    rate_jobs_per_s: float,
    max_batch_images: int = 8,
    workers: int = 1,
    jobs: int = 2000,
    images_per_job: int = 1,
    seed: int = 0,
) -> SimResult:
    """The ideal zero-overhead batcher: whatever is waiting runs the moment the model is free.

    The latency floor of request-level batching: the fleet can match it, not beat it.
    """
    policy = BatchPolicy(max_batch_images, max_wait_s=0.0, kind="fixed")
    return simulate(profile, rate_jobs_per_s, policy, workers, jobs, images_per_job, seed, overhead_s=0.0)


@dataclass(frozen=True)
class Plan:
    workers: int
    max_batch_images: int
    max_wait_ms: float
    policy: str
    predicted_p95_s: float
    predicted_throughput: float  # images per second
    utilization: float
    meets_goal: bool
    rate_jobs_per_s: float = 0.0
    p95_goal_s: float = 0.0
    # Jobs queued or running per worker at this rate (Little's law: rate x mean latency /
    # workers): the target backlog per worker an autoscaler keeps this many workers at.
    backlog_per_worker: float = 0.0

    def scaling_markdown(self) -> str:
        """The autoscaler's target for this plan (docs/KUBERNETES.md)."""
        return (
            f"scale on the backlog (queued + running jobs): target {self.backlog_per_worker:.3g} jobs per worker "
            f"keeps {self.workers} worker{'s' if self.workers != 1 else ''} at {self.rate_jobs_per_s:.3g} jobs/s "
            f"(rate x mean latency / workers); {2 * self.max_batch_images} (twice the max batch) is where a "
            "worker's reservation is full and jobs start to wait in the broker"
        )

    def to_markdown(self) -> str:
        verdict = "meets" if self.meets_goal else "MISSES"
        return (
            f"**{self.workers} worker{'s' if self.workers != 1 else ''}**, max batch {self.max_batch_images}, "
            f"max wait {self.max_wait_ms:g} ms, {self.policy}: predicted p95 {self.predicted_p95_s:.3g} s "
            f"({verdict} the {self.p95_goal_s:.3g} s goal at {self.rate_jobs_per_s:.3g} jobs/s), "
            f"{self.predicted_throughput:.3g} images/s, {self.utilization:.0%} of capacity"
        )


def plan(
    profile: Profile,
    rate_jobs_per_s: float,
    p95_goal_s: float,
    images_per_job: int = 1,
    max_workers: int = 16,
    batch_options: tuple[int, ...] = (1, 2, 4, 8),
    wait_options_ms: tuple[float, ...] = (0, 50, 200),
    policies: tuple[str, ...] = ("fixed", "adaptive"),
    overhead_s: float = 0.0,
    jobs: int = 1500,
    seed: int = 0,
) -> Plan:
    """The fewest workers, then the lowest predicted p95, that meet ``p95_goal_s`` at
    ``rate_jobs_per_s`` below ``MAX_UTILIZATION`` of capacity.

    Per configuration, a bisection over the worker count (p95 falls as workers are added),
    never above the fewest workers found so far: a few simulations per configuration.
    A goal under the latency floor (a job alone on an idle model, plus ``overhead_s``) is
    unreachable at any size; the search then aims at 5% above the floor, so the answer is
    the smallest fleet that gets close, with ``meets_goal=False``. A load that
    ``max_workers`` cannot carry gives the best p95 at ``max_workers``, also not met.
    """
    configs = _configs(batch_options, wait_options_ms, policies)
    offered = rate_jobs_per_s * images_per_job
    largest = max(batch_options)
    floor = math.ceil(images_per_job / largest) * profile.seconds(min(images_per_job, largest)) + overhead_s
    target = max(p95_goal_s, 1.05 * floor)
    results: dict[tuple[int, BatchPolicy], SimResult] = {}

    def run(workers: int, policy: BatchPolicy) -> SimResult:
        if (workers, policy) not in results:
            results[workers, policy] = simulate(
                profile, rate_jobs_per_s, policy, workers, jobs, images_per_job, seed, overhead_s
            )
        return results[workers, policy]

    def fits(workers: int, policy: BatchPolicy) -> bool:
        result = run(workers, policy)
        return result.p95 <= target and result.utilization <= MAX_UTILIZATION

    def fewest_stable(policy: BatchPolicy) -> int:
        # Below this the load exceeds MAX_UTILIZATION of full-batch capacity: no need to simulate.
        per_worker = saturation_throughput(profile, policy.max_batch_images)
        return max(1, math.ceil(offered / (MAX_UTILIZATION * per_worker) - 1e-9))

    fewest = max_workers + 1
    for policy in configs:
        low, high = fewest_stable(policy), min(max_workers, fewest)
        if low > high or not fits(high, policy):
            continue
        while low < high:
            middle = (low + high) // 2
            if fits(middle, policy):
                high = middle
            else:
                low = middle + 1
        fewest = high

    workers = min(fewest, max_workers)
    stable = [p for p in configs if fewest_stable(p) <= workers] or [max(configs, key=lambda p: p.max_batch_images)]
    policy = min([p for p in stable if fits(workers, p)] or stable, key=lambda p: run(workers, p).p95)
    result = run(workers, policy)
    return Plan(
        workers=workers,
        max_batch_images=policy.max_batch_images,
        max_wait_ms=policy.max_wait_s * 1000,
        policy=policy.kind,
        predicted_p95_s=result.p95,
        predicted_throughput=result.throughput_images_per_s,
        utilization=result.utilization,
        meets_goal=result.p95 <= p95_goal_s and result.utilization <= MAX_UTILIZATION,
        rate_jobs_per_s=rate_jobs_per_s,
        p95_goal_s=p95_goal_s,
        backlog_per_worker=rate_jobs_per_s * result.mean / workers,
    )


def _configs(
    batch_options: tuple[int, ...], wait_options_ms: tuple[float, ...], policies: tuple[str, ...]
) -> list[BatchPolicy]:
    """The grid without duplicates: at batch 1 waiting is pointless, and with no wait the
    adaptive policy runs at once, exactly like the fixed one."""
    seen: dict[tuple[int, float, str], BatchPolicy] = {}
    for size, wait_ms, kind in itertools.product(batch_options, wait_options_ms, policies):
        if size == 1 or wait_ms == 0:
            wait_ms, kind = 0, "fixed"
        seen.setdefault((size, wait_ms, kind), BatchPolicy(size, wait_ms / 1000, kind))  # type: ignore[arg-type]
    return list(seen.values())
