"""The runner: the worker's side of the model. It owns the batcher and feeds the engine.

Task threads call ``ModelRunner.submit`` with one job's images and wait on the returned
future. A dispatcher thread asks the batcher (``workers.batcher``) for the next batch and
sends it to the engine (``workers.engine``) while the previous one still runs, so the
device never waits between calls: up to ``depth`` batches are in the engine at once, the
running one and the next. A batch that is not full is held back until just before the
engine is predicted to be free, so jobs arriving meanwhile still join it. The engine's
events come back on its reader thread and resolve the jobs' futures.

Step-level batching (a queue whose ``batching`` is "step"): a batch goes to the engine at
once, with ``Join``, to be admitted into the running slots at the next step boundary. The
dispatcher sends such batches while there is room among the images that will still be
running after that boundary (a batch reporting its second-to-last step leaves at it), so a
job waits in the batcher, where it can still be canceled or expire, never in the engine.

Why the batcher lives here and not in the engine: it is pure Python that runs on every
job's arrival, and the engine's thread must do nothing but drive the model; the engine
only needs the next batch in hand when the current one ends (vLLM keeps its scheduler
beside the model for step-level scheduling; a diffusion batch is seconds long, so one
batch of look-ahead is enough).

Failures:
- a call that raises is split in halves and each half retried, down to the one job that
  fails; its neighbours succeed. Out-of-memory also lowers that shape's batch limit to
  half the failed batch for the rest of the worker's life;
- the engine dying (kill -9, segfault, OOM killer, a device error): the batch that was
  running fails its jobs with ``EngineCrashed`` (their crash count stays, see
  ``on_batch_start``; ``workers.jobs`` runs them alone next, or fails them at the cap),
  the batches still queued in the engine go back to the batcher, and a new engine starts.
  If it cannot start, ``on_engine_lost`` is called (the worker shuts down and hands its
  jobs back) and every waiting job is released.
"""

from __future__ import annotations

import enum
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from tasks.cancel import NOT_STARTED_IN_TIME
from tasks.errors import EngineCrashed, EngineStartFailed, JobCanceled, ModelOutOfMemory, PipelineError
from workers.batcher import Batch, Batcher, Request, Slice
from workers.engine_client import Engine
from workers.protocol import Join, Ready, Swapped
from workers.work import BatchKey, CompatKey, Images, ImageWork

log = logging.getLogger(__name__)

#: A batch that is not full is sent this long before the engine is predicted to be free:
#: enough for the message to be in the engine's inbox when the running call returns.
DISPATCH_LEAD_S = 0.02


class BatchObserver(Protocol):
    def batch_done(
        self, images: int, wait_s: float, inference_s: float, canceled: bool = False, model: str = ""
    ) -> None: ...

    def batch_failed(self, out_of_memory: bool = False) -> None: ...

    def waiting(self, images: int) -> None: ...

    def engine_restarted(self) -> None: ...

    def engine_ready(self, load_s: float, warm_s: float) -> None: ...

    def device_memory_used(self, allocated: int, reserved: int, peak: int) -> None: ...

    def model_loaded(self, model: str, load_s: float, warm_s: float) -> None: ...


def _recipe(key: CompatKey) -> str:
    """The model and the adapters a batch ran, for its log line."""
    adapters = "".join(f" +{name}:{scale:g}" for name, scale in key.loras)
    return f"{key.model}{adapters}"


class JobReleased(Exception):
    """The worker is stopping and this job had not started: hand its message back."""


@dataclass(frozen=True)
class JobResult:
    images: list[np.ndarray]  # (height, width, 3) uint8 each
    batch_id: str  # the call its (last) images ran in
    batch_images: int  # images in that call
    batch_wait_s: float  # from submit until its first images started
    inference_s: float  # time in model calls, summed over its slices


@dataclass(eq=False)
class PendingJob:
    """One job in the runner: its images to make and the future its task thread waits on."""

    work: list[ImageWork]
    submitted: float
    job_id: str | None = None
    expires_at: float | None = None  # canceled if no call has started it by then
    future: Future[JobResult] = field(default_factory=Future)
    images: dict[int, np.ndarray] = field(default_factory=dict)
    first_start: float | None = None
    inference_s: float = 0.0


@dataclass(eq=False)
class _InFlight:
    """A batch sent to the engine: queued there until ``started_at`` is set. ``joins``: a
    step-level batch (it joins the running ones at a step boundary)."""

    batch: Batch[PendingJob]
    joins: bool = False
    started_at: float | None = None
    step: int = 0

    @property
    def running_on(self) -> bool:
        """Still in the engine after the next step boundary: queued, or a step-level batch
        with more than one step to go (a call holds the engine until it ends: its images
        take no room from a step-level batch, which waits for it either way)."""
        if self.started_at is None:
            return True
        return self.joins and self.step < self.batch.key.compat.steps - 1

    @property
    def job_ids(self) -> list[str]:
        """The batch's jobs, once each (a job split over two slices is one job)."""
        return list(dict.fromkeys(s.request.payload.job_id for s in self.batch.slices if s.request.payload.job_id))


class _Restart(enum.Enum):
    """What the dispatcher does instead of a batch while the engine is down."""

    RESTART = "restart"


#: A job-id hook: called with the ids of a batch's jobs.
BatchHook = Callable[[list[str]], None]


class ModelRunner:
    def __init__(
        self,
        engine: Engine,
        batcher: Batcher[PendingJob],
        observer: BatchObserver | None = None,
        on_batch_start: BatchHook | None = None,
        on_batch_end: BatchHook | None = None,
        on_engine_lost: Callable[[str], None] | None = None,
        on_batch_step: Callable[[list[str], int, int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        depth: int = 2,
    ):
        """``on_batch_start`` and ``on_batch_end`` get the ids of a batch's jobs when the
        engine starts and ends its call: the worker counts a crash for each job before, and
        takes it back after, so the calls an engine or a worker died in stay counted.
        ``on_batch_step`` gets them with (step, total) at every step boundary of a call."""
        self._engine = engine
        self._batcher = batcher
        self._observer = observer
        self._on_batch_start = on_batch_start
        self._on_batch_end = on_batch_end
        self._on_engine_lost = on_engine_lost
        self._on_batch_step = on_batch_step
        self._clock = clock
        self._depth = depth
        self._cond = threading.Condition()
        self._stopping = False
        self._engine_up = False
        self._inflight: dict[int, _InFlight] = {}
        self._retries: deque[Batch[PendingJob]] = deque()  # halves of a failed batch, before anything else
        self._batch_ids = itertools.count(1)
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="dispatcher", daemon=True)
        self.model_name = ""  # the model the engine loads at start
        self._resident: tuple[str, ...] = ()  # the models the engine has loaded
        self.engine_pid: int | None = None
        self.restarts = 0

    # -- task-thread side ----------------------------------------------------------------
    def start(self, timeout_s: float | None = None) -> None:
        """Start the engine and block until its model is loaded and warm."""
        try:
            ready = self._engine.start(self, timeout_s)
        except EngineStartFailed as exc:
            raise RuntimeError(exc.message) from exc
        self.model_name, self.engine_pid = ready.model_name, ready.pid
        self._ready(ready)
        log.info("model %s ready; FLEET_BATCHING=auto runs it %s-level", ready.model_name, ready.batching)
        self._engine_up = True
        self._dispatcher.start()

    def submit(
        self,
        key: CompatKey,
        images: list[ImageWork],
        queue: str = "",
        deadline: float | None = None,
        job_id: str | None = None,
        isolated: bool = False,
        expires_at: float | None = None,
    ) -> Future[JobResult]:
        """Queue one job's images; the future resolves to a ``JobResult``.

        ``isolated`` runs the job in batches of its own: for a job that was in a call an
        engine or a worker died in, so it cannot take its neighbours along. A job no call
        has started by ``expires_at`` fails with ``JobCanceled``.
        """
        now = self._clock()
        pending = PendingJob(list(images), now, job_id, expires_at)
        batch_key = BatchKey(queue, key, alone=(job_id or str(id(pending))) if isolated else None)
        request = Request(batch_key, len(images), now, deadline, payload=pending)
        with self._cond:
            if self._stopping:
                raise JobReleased("the worker is stopping")
            self._batcher.add(request)
            self._report_waiting()
            self._cond.notify_all()
        return pending.future

    def cancel(self, job_id: str, reason: str) -> bool:
        """Drop the job ``job_id``; its future fails with ``JobCanceled``. Waiting, it
        never runs. In a batch of its own (queued in the engine or running), the engine
        stops that call at its next step boundary. In a batch it shares, the call goes on
        for its neighbours and this job's images are discarded. True if it was here."""

        def mine(s: Slice[PendingJob]) -> bool:
            return s.request.payload.job_id == job_id

        with self._cond:
            dropped = [s for s in self._batcher.waiting_slices() if mine(s)]
            for request in {id(s.request): s.request for s in dropped}.values():
                self._batcher.remove(request)
            retries: deque[Batch[PendingJob]] = deque()
            for batch in self._retries:
                dropped += [s for s in batch.slices if mine(s)]
                rest = tuple(s for s in batch.slices if not mine(s))
                if rest:
                    retries.append(Batch(batch.key, rest))
            self._retries = retries
            stop = []
            for batch_id, flight in self._inflight.items():
                ours = [s for s in flight.batch.slices if mine(s)]
                dropped += ours
                if ours and len(ours) == len(flight.batch.slices):
                    stop.append(batch_id)
            self._report_waiting()
            self._cond.notify_all()
        for batch_id in stop:
            self._engine.cancel(batch_id)
        futures = {id(s.request.payload): s.request.payload.future for s in dropped}
        for future in futures.values():
            if not future.done():
                future.set_exception(JobCanceled(reason))
        return bool(futures)

    def release_waiting(self) -> int:
        """Fail every job that has not started with ``JobReleased``; the batches in the
        engine finish. Called when the worker is told to stop. Returns how many."""
        with self._cond:
            self._stopping = True
            released = self._batcher.drain() + [s for b in self._retries for s in b.slices]
            self._retries.clear()
            self._report_waiting()
            self._cond.notify_all()
        for s in released:
            future = s.request.payload.future
            if not future.done():
                future.set_exception(JobReleased("the worker is stopping"))
        return len({id(s.request) for s in released})

    def stop(self, timeout_s: float = 60) -> None:
        """Finish the batches already queued, then end the engine."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._dispatcher.is_alive():
            self._dispatcher.join(timeout_s)
        with self._cond:
            self._cond.wait_for(lambda: not self._inflight or not self._engine_up, timeout_s)
        self.release_waiting()  # anything left if the engine was gone
        self._engine.stop(timeout_s)

    # -- the dispatcher thread -----------------------------------------------------------
    def _dispatch_loop(self) -> None:
        while True:
            with self._cond:
                batch = self._next_batch()
                if batch is None:
                    return
                if not isinstance(batch, _Restart):
                    batch_id = next(self._batch_ids)
                    joins = self._batcher.joins(batch.key)
                    self._inflight[batch_id] = _InFlight(batch, joins)  # before the engine can answer
                    join = Join(self._batcher.limit(batch.key)) if joins else None
            if isinstance(batch, _Restart):
                self._restart()
            else:
                work = [w for s in batch.slices for w in s.request.payload.work[s.start : s.start + s.count]]
                self._engine.submit(batch_id, batch.key.compat, work, join)

    def _next_batch(self) -> Batch[PendingJob] | _Restart | None:
        """Under the lock: the next batch to send, a restart, or None when stopped.

        What may go: a request-level batch while fewer than ``depth`` things are in the
        engine (the running call or step-level group counts one, each queued batch one); a
        step-level batch while no request-level one waits in the engine, within the room
        the step-level batches leave after the next step boundary (``Batcher.next_batch``)."""
        while True:
            if not self._engine_up:
                if self._stopping:
                    return None
                return _Restart.RESTART
            queued = [f for f in self._inflight.values() if f.started_at is None]
            running = len(self._inflight) > len(queued)
            calls = running + len(queued) < self._depth
            joining = None if any(not f.joins for f in queued) else self._running_images()
            if not calls and joining is None:
                self._cond.wait()
                continue
            if self._retries:
                if calls or self._batcher.joins(self._retries[0].key):
                    return self._retries.popleft()
                self._cond.wait()
                continue
            if self._stopping and not len(self._batcher):
                return None
            now = self._clock()
            if self._stopping:
                decision = self._batcher.next_batch(float("inf"), running=joining, calls=calls)
            else:
                decision = self._batcher.next_batch(
                    now, not_before=self._busy_until(), resident=self._expected_resident(), running=joining,
                    calls=calls,
                )  # fmt: skip
            if decision.batch is not None:
                self._report_waiting()
                live = tuple(s for s in decision.batch.slices if self._runnable(s, now))
                if live:
                    return Batch(decision.batch.key, live)
                continue
            self._cond.wait(None if decision.wake_at is None else max(0.0, decision.wake_at - now))

    def _running_images(self) -> int:
        """Under the lock: images of step-level batches still in the engine after the next
        step boundary."""
        return sum(f.batch.images for f in self._inflight.values() if f.joins and f.running_on)

    @staticmethod
    def _runnable(s: Slice[PendingJob], now: float) -> bool:
        """False for a slice whose job has failed or been canceled, or whose ``expires_at``
        passed before any call started it (then it is canceled here)."""
        pending = s.request.payload
        if pending.future.done():
            return False
        if pending.expires_at is not None and pending.first_start is None and now >= pending.expires_at:
            pending.future.set_exception(JobCanceled(NOT_STARTED_IN_TIME))
            return False
        return True

    def _busy_until(self) -> float | None:
        """When the engine is predicted to be free, less the dispatch lead; None when it
        is idle now or a prediction is missing (send at once)."""
        if not self._inflight:
            return None
        free_at = self._clock()
        for flight in self._inflight.values():  # in the order they were sent
            predicted = self._batcher.cost_model.predict(flight.batch.key.compat, flight.batch.images)
            if predicted is None:
                return None
            if flight.started_at is not None:
                free_at = max(free_at, flight.started_at + predicted)
            else:
                free_at += predicted
        return free_at - DISPATCH_LEAD_S

    def _ready(self, ready: Ready) -> None:
        """An engine (re)started with its first model loaded."""
        with self._cond:
            self._resident = (ready.model_name,)
            self._batcher.model_loaded(ready.model_name, ready.load_s + ready.warm_s, ready.batching)
        if self._observer:
            self._observer.engine_ready(ready.load_s, ready.warm_s)
            self._observer.model_loaded(ready.model_name, ready.load_s, ready.warm_s)

    def _expected_resident(self) -> frozenset[str]:
        """Under the lock: the models loaded once the batches sent are running: those the
        engine said, unless a batch waiting in it names another, which may evict them all."""
        resident = set(self._resident)
        for flight in self._inflight.values():  # in the order they were sent
            model = flight.batch.key.compat.model
            if flight.started_at is None and model not in resident:
                resident = {model}
        return frozenset(resident)

    def _restart(self) -> None:
        try:
            ready = self._engine.start(self)
        except EngineStartFailed as exc:
            log.critical("the engine could not be restarted: %s", exc.message)
            self.release_waiting()
            if self._on_engine_lost is not None:
                self._on_engine_lost(exc.message)
            return
        log.warning("a new engine is ready (pid %s)", ready.pid)
        self.restarts += 1
        if self._observer:
            self._observer.engine_restarted()
        self._ready(ready)
        with self._cond:
            self.engine_pid = ready.pid
            self._engine_up = True
            self._cond.notify_all()

    # -- engine events (its reader thread) -----------------------------------------------
    def model_swapped(self, swapped: Swapped) -> None:
        with self._cond:
            self._resident = swapped.resident
            self._batcher.model_loaded(swapped.model, swapped.load_s + swapped.warm_s, swapped.batching)
            self._cond.notify_all()
        if self._observer:
            self._observer.model_loaded(swapped.model, swapped.load_s, swapped.warm_s)
        log.info(
            "batch %s-%s: model %s loaded in %.2fs, warm in %.2fs; loaded now: %s", self.engine_pid,
            swapped.batch_id, swapped.model, swapped.load_s, swapped.warm_s, ", ".join(swapped.resident),
            extra={"batch_id": f"{self.engine_pid}-{swapped.batch_id}", "model": swapped.model},
        )  # fmt: skip

    def batch_started(self, batch_id: int) -> None:
        with self._cond:
            flight = self._inflight.get(batch_id)
            if flight is None:
                return
            flight.started_at = self._clock()
            self._cond.notify_all()  # it no longer waits in the engine: what it held back may go
        self._hook(self._on_batch_start, flight.job_ids)

    def batch_step(self, batch_id: int, step: int, total: int) -> None:
        flight = self._inflight.get(batch_id)
        if flight is not None:
            flight.step = step
            if flight.joins and step == total - 1:  # its room opens at the next boundary
                with self._cond:
                    self._cond.notify_all()
            on_step = self._on_batch_step
            if on_step is not None:
                self._hook(lambda job_ids: on_step(job_ids, step, total), flight.job_ids)

    def batch_done(
        self, batch_id: int, images: Images | None, inference_s: float, canceled: bool, shared_images: float = 0.0
    ) -> None:
        """``shared_images``: a step-level batch's mean images per model call (its own and
        its neighbours'): what its jobs' ``batch_images`` and the batch metrics report, as a
        request-level batch reports the images of its call."""
        with self._cond:
            flight = self._inflight.pop(batch_id, None)
            if flight is None:
                return
            batch = flight.batch
            # A call stopped early says nothing of what a call costs, nor does a step-level
            # batch's time, shared with whatever ran beside it.
            if not canceled and not flight.joins:
                self._batcher.cost_model.observe(batch.key.compat, batch.images, inference_s)
            self._cond.notify_all()
        self._hook(self._on_batch_end, flight.job_ids)
        started = flight.started_at if flight.started_at is not None else self._clock()
        canceled = canceled or images is None
        call_images = max(1, round(shared_images)) if shared_images else batch.images
        if self._observer:
            self._observer.batch_done(
                call_images, started - batch.oldest_arrival, inference_s, canceled, batch.key.compat.model
            )
        label = f"{self.engine_pid}-{batch_id}"
        shared = f", its steps shared with {shared_images:.1f} images on average" if shared_images else ""
        log.info(
            "batch %s: %d image(s) of %d job(s) on %s%s, waited %.3fs, model %.3fs%s", label, batch.images,
            len(batch.slices), _recipe(batch.key.compat), " canceled" * canceled, started - batch.oldest_arrival,
            inference_s, shared,
            extra={"batch_id": label, "batch_images": call_images, "job_ids": flight.job_ids,
                   "batch_wait_s": started - batch.oldest_arrival, "inference_s": inference_s,
                   "model": batch.key.compat.model},
        )  # fmt: skip
        if canceled or images is None:  # the thread engine hands a canceled call's images over too
            for s in batch.slices:
                if not s.request.payload.future.done():
                    s.request.payload.future.set_exception(JobCanceled("the batch was canceled"))
            return
        offset = 0
        for s in batch.slices:
            self._deliver(s, images[offset : offset + s.count], started, inference_s, label, call_images)
            offset += s.count

    def batch_failed(self, batch_id: int, error: str, out_of_memory: bool, call_images: int = 0) -> None:
        """``call_images``: a step-level batch failed in a model call it shared with others,
        of that many images."""
        with self._cond:
            flight = self._inflight.pop(batch_id, None)
            if flight is None:
                return
            retry = self._split(flight.batch, error, out_of_memory, call_images)
            self._retries.extendleft(reversed(retry))
            self._cond.notify_all()
        self._hook(self._on_batch_end, flight.job_ids)
        if self._observer:
            self._observer.batch_failed(out_of_memory)
        log.warning(
            "batch %s-%s of %d image(s) failed%s: %s", self.engine_pid, batch_id, flight.batch.images,
            " (out of memory)" * out_of_memory, error,
            extra={"batch_id": f"{self.engine_pid}-{batch_id}", "job_ids": flight.job_ids},
        )  # fmt: skip

    def engine_died(self, reason: str) -> None:
        with self._cond:
            self._engine_up = False
            lost, self._inflight = list(self._inflight.values()), {}
            crashed = [f for f in lost if f.started_at is not None]
            for flight in lost:
                if flight.started_at is None:
                    self._batcher.requeue(list(flight.batch.slices))
            self._cond.notify_all()
        log.error(
            "%s: %d job(s) in its call fail this attempt, %d batch(es) waiting in it go back to the batcher",
            reason,
            sum(len(f.batch.slices) for f in crashed),
            len(lost) - len(crashed),
        )
        for flight in crashed:
            for s in flight.batch.slices:
                future = s.request.payload.future
                if not future.done():
                    future.set_exception(EngineCrashed(reason))

    def device_memory(self, allocated: int, reserved: int, peak: int) -> None:
        """The engine's GPU memory after a call (CUDA only)."""
        if self._observer:
            self._observer.device_memory_used(allocated, reserved, peak)

    # -- helpers --------------------------------------------------------------------------
    def _split(
        self, batch: Batch[PendingJob], error: str, out_of_memory: bool, call_images: int = 0
    ) -> list[Batch[PendingJob]]:
        """Under the lock: the halves to retry; fails the job when it is alone. A batch that
        failed in a call it shared (step-level) is retried whole, as a call of its own: the
        fault may be a neighbour's, or the call's size."""
        slices = list(batch.slices)
        ran_out_at = max(batch.images, call_images)  # the images of the call that failed
        if out_of_memory and ran_out_at > 1:
            self._batcher.lower_limit(batch.key, ran_out_at // 2)
            log.warning("out of memory at %d images: batches of this shape now hold at most %d", ran_out_at,
                        ran_out_at // 2)  # fmt: skip
        if call_images > batch.images:
            first = next((s.request.payload.job_id for s in slices if s.request.payload.job_id), None)
            alone = BatchKey(batch.key.queue, batch.key.compat, alone=first or f"batch-{id(batch)}")
            return [Batch(alone, tuple(slices))]
        if len(slices) == 1 and (not out_of_memory or slices[0].count == 1):
            future = slices[0].request.payload.future
            if not future.done():
                future.set_exception(ModelOutOfMemory(error) if out_of_memory else PipelineError(error))
            return []
        if len(slices) == 1:  # one slice out of memory: halve the slice itself
            s = slices[0]
            half = s.count // 2
            slices = [Slice(s.request, s.start, half, s.seq), Slice(s.request, s.start + half, s.count - half, s.seq)]
        middle = len(slices) // 2
        return [Batch(batch.key, tuple(part)) for part in (slices[:middle], slices[middle:])]

    @staticmethod
    def _hook(hook: BatchHook | None, job_ids: list[str]) -> None:
        if hook is None:
            return
        try:
            hook(job_ids)
        except Exception:
            log.exception("batch hook failed; the batch goes on")

    def _deliver(
        self, s: Slice[PendingJob], images: Images, started: float, inference_s: float, batch_id: str, batch_images: int
    ) -> None:
        pending = s.request.payload
        if pending.future.done():
            return
        for offset in range(s.count):
            pending.images[s.start + offset] = images[offset]
        if pending.first_start is None:
            pending.first_start = started
        pending.inference_s += inference_s
        if len(pending.images) == len(pending.work) and pending.future.set_running_or_notify_cancel():
            pending.future.set_result(
                JobResult(
                    images=[pending.images[i] for i in range(len(pending.work))],
                    batch_id=batch_id,
                    batch_images=batch_images,
                    batch_wait_s=pending.first_start - pending.submitted,
                    inference_s=pending.inference_s,
                )
            )

    def _report_waiting(self) -> None:
        if self._observer:
            self._observer.waiting(self._batcher.waiting_images)
