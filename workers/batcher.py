"""The micro-batcher: which waiting requests share the next model call, and when.

Pure logic, no threads, no Celery, no torch: requests go in with ``add``; the runner's
dispatcher asks ``next_batch(now)`` whenever the engine can take a batch and gets either a batch to run or
how long it may sleep before asking again. A fake clock tests it in milliseconds.

Forming a batch
    Requests are served oldest first: the oldest waiting request picks the batch key (its
    queue and compat key: model, size, steps, guidance, scheduler; ``workers.work.BatchKey``), and
    the batch takes that key's requests in arrival order while they fit in
    ``max_batch_images`` (a job with ``num_images=3`` counts 3). Keys never mix, and a
    key that arrived first is served first, so no key starves. A job larger than
    ``max_batch_images`` is cut into slices of at most that many images; its full slices
    run as batches of their own, its last one may share a call with other jobs.

Models that must be loaded first (a worker serving several)
    The runner says which models the engine will have loaded (``resident``). When the
    oldest request's model is not among them, running it means a swap. The batcher swaps
    once that request has waited ``SWAP_PATIENCE`` times what loading its model costs
    (``swap_cost``: measured at each load), or earlier once the loaded models have gone
    quiet: nothing of theirs waiting and none arrived for one swap's time. Until then it
    serves the loaded models' requests (or waits for them). So under a mixed load a swap
    takes at most about ``1 / (1 + SWAP_PATIENCE)`` of the time and the worker never
    alternates models batch by batch, even when the requests it holds are, for a moment,
    all another model's; and a model whose turn comes while the other is idle waits one
    swap time at most.

When a batch runs (``fixed`` policy)
    - at once if it is full (no waiting request of its key fits any more);
    - when ``max_wait_ms`` has passed since its oldest request arrived
      (``max_wait_ms=0`` never waits);
    - earlier if waiting longer would make one of its requests miss its deadline, given
      the batch time the cost model predicts.

When a batch runs (``adaptive`` policy)
    The cost model fits the time of one call online, per key: ``t(n) = a*n + b`` over
    recent batches; the batcher also tracks the rate ``r`` at which images of the key
    arrive. A model that starts whatever is waiting the moment it is free already grows
    its batches with the load (while a batch of ``n`` runs, ``r * t(n)`` images arrive:
    the batch size settles where the model keeps up), so waiting is never needed to keep
    up; it only pays when it saves more time than it costs. A batch of ``n`` images waits
    for one more only if the ``n`` images together lose less time waiting for it
    (``n / r``, the expected gap to the next arrival) than the fixed cost ``b`` of the
    separate call that newcomer would otherwise need. So a lone request to an idle model
    with nothing else coming starts at once, and waiting happens only when arrivals are
    dense compared with ``b``; never past ``max_wait_ms`` or a deadline.

Step-level batching (a queue's ``batching`` is "step")
    A batch need not wait for the running one to end: the engine admits it into the
    running slots at the next step boundary (``workers.stepping``). So there is nothing to
    gain by holding it back: it is taken the moment there is room for it among the images
    that will still be running after that boundary (``running``), oldest first, with no
    ``max_wait_ms``, adaptive wait or ``not_before``. Jobs isolated after a crash never
    join others.

While the model is busy
    The worker sends the next batch to the engine before the running one ends, so the
    device never waits for it (``workers.runner``). A batch that is not full is held until
    just before the model is predicted to be free (``not_before``): images arriving
    meanwhile still join it, since taking it earlier would not start it earlier.

State per key
    Cost fits and batch limits are kept per compat key (a call's cost depends on its shape,
    not on the queue it came from), arrival rates per queue and compat key; each map holds
    at most ``MAX_KEYS`` keys, least recently used dropped first, so a worker serving many
    shapes, or isolating many jobs, keeps bounded state.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from tasks.settings import BatchingMode, BatchingSetting
from workers.cost import CostProfile
from workers.work import BatchKey, CompatKey

RATE_WINDOW_S = 10.0
MAX_KEYS = 256
#: How many times its model's load time the oldest request waits behind a loaded model's
#: requests before the batcher swaps to it.
SWAP_PATIENCE = 4.0

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
#: What the caller attaches to a request (the runner: the job's future and images).
P = TypeVar("P")


class LruMap(Generic[K, V]):
    """A map of at most ``maxsize`` entries; using an entry makes it the newest."""

    def __init__(self, factory: Callable[[], V], maxsize: int = MAX_KEYS):
        self._factory = factory
        self._maxsize = maxsize
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return None

    def setdefault(self, key: K) -> V:
        value = self.get(key)
        if value is None:
            value = self._items[key] = self._factory()
            if len(self._items) > self._maxsize:
                self._items.popitem(last=False)
        return value

    def set(self, key: K, value: V) -> None:
        self.setdefault(key)
        self._items[key] = value

    def pop(self, key: K) -> None:
        self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_images: int = 8
    max_wait_s: float = 0.05
    kind: Literal["fixed", "adaptive"] = "fixed"
    batching: BatchingSetting = "request"

    def __post_init__(self) -> None:
        if self.max_batch_images < 1:
            raise ValueError("max_batch_images must be at least 1")
        if self.max_wait_s < 0:
            raise ValueError("max_wait must not be negative")


@dataclass(eq=False)
class Request(Generic[P]):
    """One job's images waiting for the model. ``payload`` is the caller's."""

    key: BatchKey
    images: int
    arrival: float
    deadline: float | None
    payload: P


@dataclass(frozen=True, eq=False)
class Slice(Generic[P]):
    """Images ``start .. start+count`` of a request: the unit a batch is made of."""

    request: Request[P]
    start: int
    count: int
    seq: int  # arrival order among slices

    @property
    def arrival(self) -> float:
        return self.request.arrival


@dataclass(frozen=True)
class Batch(Generic[P]):
    key: BatchKey
    slices: tuple[Slice[P], ...]

    @property
    def images(self) -> int:
        return sum(s.count for s in self.slices)

    @property
    def oldest_arrival(self) -> float:
        return min(s.arrival for s in self.slices)


@dataclass(frozen=True)
class Decision(Generic[P]):
    """Run ``batch`` now, or (``batch is None``) ask again at ``wake_at`` (None: on the next add)."""

    batch: Batch[P] | None = None
    wake_at: float | None = None


class CostModel:
    """Per compat key, ``t(n) = a*n + b`` fitted by least squares over the last batches."""

    def __init__(self, window: int = 32):
        self._window = window
        self._samples: LruMap[CompatKey, deque[tuple[int, float]]] = LruMap(lambda: deque(maxlen=window))

    def observe(self, key: CompatKey, images: int, seconds: float) -> None:
        self._samples.setdefault(key).append((images, seconds))

    def coefficients(self, key: CompatKey) -> tuple[float, float] | None:
        samples = self._samples.get(key)
        if not samples:
            return None
        fit = CostProfile.fit(samples)
        if fit is None:
            # One batch size seen so far: a neutral prior (at batch 1, half the call is
            # fixed overhead) until a second size is seen.
            images = samples[-1][0]
            per_call = sum(y for _, y in samples) / len(samples) / (images + 1)
            return per_call, per_call
        return max(fit.a, 0.0), max(fit.b, 0.0)

    def predict(self, key: CompatKey, images: int) -> float | None:
        fit = self.coefficients(key)
        return None if fit is None else fit[0] * images + fit[1]


class ArrivalRate:
    """Images per second arriving for each key over the last ``RATE_WINDOW_S`` seconds."""

    def __init__(self, window_s: float = RATE_WINDOW_S):
        self._window_s = window_s
        self._arrivals: LruMap[BatchKey, deque[tuple[float, int]]] = LruMap(deque)

    def add(self, key: BatchKey, at: float, images: int) -> None:
        self._arrivals.setdefault(key.shared).append((at, images))

    def rate(self, key: BatchKey, now: float) -> float:
        arrivals = self._arrivals.get(key.shared)
        if arrivals is None:
            return 0.0
        while arrivals and arrivals[0][0] < now - self._window_s:
            arrivals.popleft()
        if len(arrivals) < 2:
            return 0.0
        span = max(now - arrivals[0][0], 1e-3)
        return sum(images for _, images in arrivals) / span


class Batcher(Generic[P]):
    def __init__(
        self,
        policy: BatchPolicy,
        cost_model: CostModel | None = None,
        policy_of: Callable[[str], BatchPolicy] | None = None,
    ):
        """``policy`` applies to every queue unless ``policy_of(queue)`` gives another."""
        self.policy = policy
        self.cost_model = cost_model or CostModel()
        self.arrivals = ArrivalRate()
        self._policy_of = policy_of
        self._limits: LruMap[CompatKey, int] = LruMap(int)  # lowered after out-of-memory
        self._waiting: list[Slice[P]] = []
        self._seq = itertools.count()
        self._swap_costs: dict[str, float] = {}  # model -> seconds its last load took
        self._batching: dict[str, BatchingMode] = {}  # model -> what "auto" runs it with
        self._last_arrival: dict[str, float] = {}  # model -> when its newest request came

    def model_loaded(self, model: str, seconds: float, batching: BatchingMode = "request") -> None:
        """Loading ``model`` (and warming it) took ``seconds``; the engine runs it best
        with ``batching`` (``Model.batching``), what an "auto" queue's batches of it take."""
        self._swap_costs[model] = seconds
        self._batching[model] = batching

    def swap_cost(self, model: str) -> float:
        """What loading ``model`` is expected to cost: its last load, else the dearest seen."""
        return self._swap_costs.get(model, max(self._swap_costs.values(), default=0.0))

    # -- input -------------------------------------------------------------------------
    def policy_of(self, key: BatchKey) -> BatchPolicy:
        return self._policy_of(key.queue) if self._policy_of else self.policy

    def joins(self, key: BatchKey) -> bool:
        """Whether ``key``'s batches join the running ones at step boundaries: its queue's
        ``batching`` is "step", or "auto" and its model runs best so (request-level until
        the engine has said, once the model is loaded); never for a job isolated after a crash."""
        batching = self.policy_of(key).batching
        if batching == "auto":
            batching = self._batching.get(key.compat.model, "request")
        return batching == "step" and key.alone is None

    def limit(self, key: BatchKey) -> int:
        policy_limit = self.policy_of(key).max_batch_images
        lowered = self._limits.get(key.compat)
        return policy_limit if lowered is None else min(lowered, policy_limit)

    def lower_limit(self, key: BatchKey, images: int) -> None:
        """Cap the batch size of ``key``'s shape (after an out-of-memory error)."""
        self._limits.set(key.compat, max(1, images))

    def add(self, request: Request[P]) -> list[Slice[P]]:
        limit = self.limit(request.key)
        slices = [
            Slice(request, start, min(limit, request.images - start), next(self._seq))
            for start in range(0, request.images, limit)
        ]
        self._waiting.extend(slices)
        self.arrivals.add(request.key, request.arrival, request.images)
        model = request.key.compat.model
        self._last_arrival[model] = max(request.arrival, self._last_arrival.get(model, request.arrival))
        return slices

    def requeue(self, slices: list[Slice[P]]) -> None:
        """Put slices of a failed batch back, in their original order, ahead of later ones."""
        self._waiting.extend(slices)
        self._waiting.sort(key=lambda s: s.seq)

    def remove(self, request: Request[P]) -> list[Slice[P]]:
        """Take the waiting slices of ``request`` out (its job was canceled)."""
        removed = [s for s in self._waiting if s.request is request]
        self._waiting = [s for s in self._waiting if s.request is not request]
        return removed

    def drain(self) -> list[Slice[P]]:
        """Take every waiting slice out (the worker is stopping)."""
        drained, self._waiting = self._waiting, []
        return drained

    def waiting_slices(self) -> list[Slice[P]]:
        return list(self._waiting)

    @property
    def waiting_images(self) -> int:
        return sum(s.count for s in self._waiting)

    def __len__(self) -> int:
        return len(self._waiting)

    # -- decision ----------------------------------------------------------------------
    def next_batch(
        self,
        now: float,
        not_before: float | None = None,
        resident: Collection[str] | None = None,
        running: int | None = 0,
        calls: bool = True,
    ) -> Decision[P]:
        """``not_before``: the model is busy until about then, so a batch that is not full
        is not taken earlier (newcomers can still join it). ``resident``: the models the
        engine has loaded (None: every model is). ``running``: images of step-level batches
        that will still be running after the next step boundary: a batch that joins
        (``joins``) takes at most the room they leave; None: none may join now. ``calls``:
        False when no request-level batch may go now (the engine has enough queued)."""
        if not self._waiting:
            return Decision[P]()
        key, swap_at = self._choose_key(now, resident)
        if key is None:  # only another model's requests, and not yet its turn
            return Decision[P](wake_at=swap_at)
        policy = self.policy_of(key)
        joins = self.joins(key)
        may_go = running is not None if joins else calls
        if not may_go:  # the runner wakes us when that changes
            return Decision[P](wake_at=swap_at)
        running = running or 0
        limit = max(0, self.limit(key) - running) if joins else self.limit(key)
        chosen: list[Slice[P]] = []
        room = limit
        candidates = [s for s in self._waiting if s.request.key == key]
        for candidate in candidates:
            if candidate.count <= room:
                chosen.append(candidate)
                room -= candidate.count
            elif joins:  # no overtaking: the oldest joins first, when there is room for it
                break
        if joins:
            # Step-level: nothing is gained by holding a batch back, since newcomers join it
            # at any step boundary; it goes the moment it has room.
            return self._take(key, chosen) if chosen else Decision[P](wake_at=swap_at)
        images = limit - room
        left_out = [s for s in candidates if s not in chosen]
        full = room == 0 or bool(left_out)

        wake_at = self._wake_at(key, chosen, images, policy, now)
        if not_before is not None:
            wake_at = max(wake_at, not_before)
        if swap_at is not None:  # ask again when the other model's turn comes
            wake_at = min(wake_at, swap_at)
        if full or wake_at <= now:
            return self._take(key, chosen)
        return Decision[P](wake_at=wake_at)

    def _choose_key(self, now: float, resident: Collection[str] | None) -> tuple[BatchKey | None, float | None]:
        """The key of the next batch: the oldest request's, unless its model is not loaded
        and its turn has not come (``SWAP_PATIENCE``, or the loaded models quiet); then the
        oldest of a loaded model's (None if there is none), and when to look again."""
        oldest = self._waiting[0].request
        model = oldest.key.compat.model
        if resident is None or model in resident:
            return oldest.key, None
        cost = self.swap_cost(model)
        swap_at = oldest.arrival + SWAP_PATIENCE * cost
        kept = next((s.request for s in self._waiting if s.request.key.compat.model in resident), None)
        if kept is None:  # the loaded models' turn lasts while they keep coming
            last = max((self._last_arrival.get(m, float("-inf")) for m in resident), default=float("-inf"))
            swap_at = min(swap_at, last + cost)
        if now >= swap_at:
            return oldest.key, None
        return (kept.key if kept is not None else None), swap_at

    def _wake_at(self, key: BatchKey, chosen: list[Slice[P]], images: int, policy: BatchPolicy, now: float) -> float:
        oldest = min(s.arrival for s in chosen)
        wake_at = oldest + policy.max_wait_s
        predicted = self.cost_model.predict(key.compat, images)
        deadlines = [s.request.deadline for s in chosen if s.request.deadline is not None]
        if deadlines:
            # Start early enough that the batch is predicted to finish before the deadline.
            wake_at = min(wake_at, min(deadlines) - (predicted or 0.0))
        if policy.kind == "adaptive":
            newest = max(s.arrival for s in chosen)
            wake_at = min(wake_at, self._adaptive_wake_at(key, images, newest, now))
        return wake_at

    def _adaptive_wake_at(self, key: BatchKey, images: int, newest: float, now: float) -> float:
        fit = self.cost_model.coefficients(key.compat)
        rate = self.arrivals.rate(key, now)
        if fit is None or rate <= 0 or images >= self.limit(key):
            return now  # nothing to go on, nothing else coming, or full: start at once
        _, b = fit
        gap = 1.0 / rate  # expected time until the next image arrives
        if images * gap >= b:
            return now  # waiting costs the batch more than a separate call would
        # Wait for the next arrival, counted from the newest one; ask again then.
        return newest + gap

    def _take(self, key: BatchKey, chosen: list[Slice[P]]) -> Decision[P]:
        taken = set(map(id, chosen))
        self._waiting = [s for s in self._waiting if id(s) not in taken]
        return Decision(batch=Batch(key=key, slices=tuple(chosen)))
