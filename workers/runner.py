"""The model thread: the one thread that loads, warms and runs the model, batch by batch.

Task threads call ``ModelRunner.submit`` with one job's images and wait on the returned
future. The model thread asks the batcher (``workers.batcher``) for the next batch
whenever it is free, runs it as one model call, and hands each job its images. While it
runs, task threads keep adding jobs, so the next batch is gathered during this one, and
the last batch's PNGs are encoded and uploaded on the task threads meanwhile.

Torch is never touched from another thread: two thread teams fighting over the cores
make every call about 2x slower (DESIGN.md, "Measured facts").

A failing call is split in halves and each half retried, down to the one job that fails;
its neighbours succeed. An out-of-memory error also lowers that key's batch limit to half
the failed batch for the rest of the worker's life.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image

from tasks.errors import ModelOutOfMemory
from workers.batcher import Batch, Batcher, Request, Slice
from workers.work import CompatKey, ImageWork, Model

log = logging.getLogger(__name__)


class BatchObserver(Protocol):
    def batch_done(self, images: int, wait_s: float, inference_s: float) -> None: ...

    def batch_failed(self) -> None: ...

    def waiting(self, images: int) -> None: ...


class JobReleased(Exception):
    """The worker is stopping and this job had not started: hand its message back."""


@dataclass(frozen=True)
class JobResult:
    images: list[Image.Image]
    batch_id: str  # the call its (last) images ran in
    batch_images: int  # images in that call
    batch_wait_s: float  # from submit until its first images started
    inference_s: float  # time in model calls, summed over its slices


@dataclass(eq=False)
class _Pending:
    key: CompatKey
    work: list[ImageWork]
    submitted: float
    tag: object = None
    future: Future = field(default_factory=Future)
    images: dict[int, Image.Image] = field(default_factory=dict)
    first_start: float | None = None
    inference_s: float = 0.0
    batch_id: str = ""
    batch_images: int = 0


class ModelRunner:
    def __init__(
        self,
        load_model: Callable[[], Model],
        warm_size: tuple[int, int],
        batcher: Batcher,
        batch_key: Callable[[CompatKey, str], Hashable] = lambda key, queue: (queue, key),
        observer: BatchObserver | None = None,
        on_batch_start: Callable[[list[object]], None] | None = None,
        on_batch_end: Callable[[list[object]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        """``on_batch_start`` and ``on_batch_end`` get the tags of a batch's jobs around
        the model call, on the model thread: the worker counts a crash for each job
        before, and takes it back after, so the calls a worker died in stay counted."""
        self._load_model = load_model
        self._warm_size = warm_size
        self._batcher = batcher
        self._batch_key = batch_key
        self._observer = observer
        self._on_batch_start = on_batch_start
        self._on_batch_end = on_batch_end
        self._clock = clock
        self._cond = threading.Condition()
        self._stopping = False
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="model", daemon=True)
        self._batch_ids = itertools.count(1)
        self._model: Model | None = None
        self.model_name = ""

    # -- task-thread side ----------------------------------------------------------------
    def start(self, timeout_s: float | None = None) -> None:
        """Start the model thread and block until the model is loaded and warm."""
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError("the model did not load in time")
        if self._load_error is not None:
            raise RuntimeError(f"the model failed to load: {self._load_error}") from self._load_error

    def submit(
        self,
        key: CompatKey,
        images: list[ImageWork],
        queue: str = "",
        deadline: float | None = None,
        tag: object = None,
        isolated: bool = False,
    ) -> Future:
        """Queue one job's images; the future resolves to a ``JobResult``.

        ``isolated`` runs the job in batches of its own: for a job that was in a batch
        when a worker died, so a job that kills workers cannot take its neighbours along.
        """
        now = self._clock()
        pending = _Pending(key, list(images), now, tag)
        batch_key = self._batch_key(key, queue)
        if isolated:
            batch_key = (batch_key, object())
        request = Request(batch_key, len(images), now, deadline, payload=pending)
        with self._cond:
            if self._stopping:
                raise JobReleased("the worker is stopping")
            self._batcher.add(request)
            self._report_waiting()
            self._cond.notify()
        return pending.future

    def release_waiting(self) -> int:
        """Fail every job that has not started with ``JobReleased``; the batch running now
        finishes. Called when the worker is told to stop. Returns how many were released."""
        with self._cond:
            self._stopping = True
            released = self._batcher.drain()
            self._report_waiting()
            self._cond.notify()
        for s in released:
            future = s.request.payload.future
            if not future.done():
                future.set_exception(JobReleased("the worker is stopping"))
        return len({id(s.request) for s in released})

    def stop(self, timeout_s: float = 60) -> None:
        """Finish the batches already queued, then end the model thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout_s)

    # -- model-thread side ---------------------------------------------------------------
    def _main(self) -> None:
        try:
            model = self._load_model()
            model.warm(*self._warm_size)
            self._model = model
            self.model_name = model.name
            log.info(
                "model %s loaded and warm on thread %s (pid %s)", model.name, threading.get_native_id(), os.getpid()
            )
        except BaseException as exc:  # surfaced by start()
            self._load_error = exc
            self._ready.set()
            return
        self._ready.set()
        while (batch := self._next_batch()) is not None:
            self._run(batch)

    def _next_batch(self) -> Batch | None:
        with self._cond:
            while True:
                if self._stopping and not len(self._batcher):
                    return None
                now = self._clock()
                decision = self._batcher.next_batch(now if not self._stopping else float("inf"))
                if decision.batch is not None:
                    self._report_waiting()
                    return decision.batch
                timeout = None if decision.wake_at is None else max(0.0, decision.wake_at - now)
                self._cond.wait(timeout)

    def _run(self, batch: Batch) -> None:
        slices = [s for s in batch.slices if not s.request.payload.future.done()]
        if not slices:
            return
        pending0: _Pending = slices[0].request.payload
        work = [w for s in slices for w in s.request.payload.work[s.start : s.start + s.count]]
        tags = [s.request.payload.tag for s in slices]
        self._hook(self._on_batch_start, tags)
        started = self._clock()
        try:
            images = self._model.run(pending0.key, work)
        except Exception as exc:
            self._hook(self._on_batch_end, tags)
            self._retry_smaller(batch.key, slices, exc, out_of_memory=isinstance(exc, ModelOutOfMemory))
            return
        finished = self._clock()
        self._hook(self._on_batch_end, tags)
        batch_id = f"{os.getpid()}-{next(self._batch_ids)}"
        self._batcher.cost_model.observe(batch.key, len(work), finished - started)
        if self._observer:
            self._observer.batch_done(len(work), started - min(s.arrival for s in slices), finished - started)
        offset = 0
        for s in slices:
            self._deliver(s, images[offset : offset + s.count], started, finished, batch_id, len(work))
            offset += s.count

    @staticmethod
    def _hook(hook: Callable[[list[object]], None] | None, tags: list[object]) -> None:
        if hook is None:
            return
        try:
            hook(tags)
        except Exception:
            log.exception("batch hook failed; the batch goes on")

    def _retry_smaller(self, key: Hashable, slices: list[Slice], exc: Exception, out_of_memory: bool) -> None:
        if self._observer:
            self._observer.batch_failed()
        images = sum(s.count for s in slices)
        if out_of_memory and images > 1:
            self._batcher.lower_limit(key, images // 2)
            log.warning("out of memory at %d images: batches of this key now hold at most %d", images, images // 2)
        if len(slices) == 1 and (not out_of_memory or slices[0].count == 1):
            future = slices[0].request.payload.future
            if not future.done():
                future.set_exception(exc)
            return
        if len(slices) == 1:  # one slice out of memory: halve the slice itself
            s = slices[0]
            half = s.count // 2
            slices = [Slice(s.request, s.start, half, s.seq), Slice(s.request, s.start + half, s.count - half, s.seq)]
        middle = len(slices) // 2
        for part in (slices[:middle], slices[middle:]):
            self._run(Batch(key=key, slices=tuple(part)))

    def _deliver(
        self, s: Slice, images: list[Image.Image], started: float, finished: float, batch_id: str, batch_images: int
    ) -> None:
        pending: _Pending = s.request.payload
        for offset, image in enumerate(images):
            pending.images[s.start + offset] = image
        if pending.first_start is None:
            pending.first_start = started
        pending.inference_s += finished - started
        pending.batch_id, pending.batch_images = batch_id, batch_images
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
