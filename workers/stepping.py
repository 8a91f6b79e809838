"""Step-level batching in the engine: batches that join a running group at step boundaries.

A request-level batch is one model call from its first step to its last; a batch that
arrives meanwhile waits for all of it. A ``StepGroup`` instead runs the model's denoising
loop one step at a time (``workers.work.Stepper``) over the slots of every batch admitted so
far: a batch sent with ``Join`` is admitted at the next step boundary when its key joins the
group's (``CompatKey.joins``: same model, size, scheduler and adapters; steps and guidance
may differ) and the group has room, each batch counts its own steps (its own ``Step``
messages, exact progress per job), and a batch whose steps are done leaves at once: its
slots are decoded at that boundary, its ``Done`` sent, and the others run on.

The batches admitted at one boundary have their prompts encoded in one call, and the
batches that finish at one boundary are decoded in one autoencoder call: at saturation
jobs join and leave in waves, and one call of 8 costs far less than 8 calls of 1
(docs/BENCHMARKS.md, section 13, measures it, and what decoding in chunks would cost).

Failures stay with their batch where they can: a batch whose admission fails (an adapter
that does not load, a prompt the encoder refuses) fails alone, the others admitted with it
being admitted again one by one, and so does a batch whose decoding fails; a step that raises fails
every batch in the group, since they shared the call, and says how many images it held
(``Failed.call_images``): the runner retries each batch alone, as a call of its own, so the
one at fault fails by itself; a device error ends the engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from tasks.errors import DeviceLost, FleetError, ModelOutOfMemory
from workers.protocol import Failed, FromEngine, RunBatch, Started, Step
from workers.work import CompatKey, Images, Slots, Stepper

log = logging.getLogger(__name__)

#: How a finished (or canceled: images None) batch leaves: (batch, images, seconds since
#: admitted, the mean images of the steps it ran in).
Finish = Callable[[RunBatch, Images | None, float, float], None]


@dataclass(eq=False)
class _Running:
    batch: RunBatch
    slots: Slots
    admitted: float
    stepped_images: int = 0  # the images of every step it ran in, summed

    @property
    def shared_images(self) -> float:
        return self.stepped_images / max(1, self.slots.step_index)


class StepGroup:
    """The batches running step by step together, on one model's ``Stepper``."""

    def __init__(
        self,
        stepper: Stepper,
        key: CompatKey,
        send: Callable[[FromEngine], None],
        finish: Finish,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self._stepper = stepper
        self.key = key
        self._send = send
        self._finish = finish
        self._clock = clock
        self._running: list[_Running] = []

    def __bool__(self) -> bool:
        return bool(self._running)

    @property
    def images(self) -> int:
        return sum(len(r.batch.work) for r in self._running)

    def joinable(self, batch: RunBatch, joining: Sequence[RunBatch] = ()) -> bool:
        """Whether ``batch`` may join at this boundary, beside those already ``joining``."""
        images = self.images + sum(len(b.work) for b in joining) + len(batch.work)
        return (
            batch.join is not None
            and self.key.joins(batch.key)
            and images <= max(batch.join.max_images, len(batch.work))
        )

    def admit(self, batches: list[RunBatch]) -> None:
        """The batches join the group (``Started``), admitted together: their prompts are
        encoded in one call. If that fails, each is admitted alone, so only the batch at
        fault fails (``Failed``)."""
        try:
            admitted = self._stepper.admit([(b.key, list(b.work)) for b in batches])
        except DeviceLost:
            raise
        except Exception as exc:
            if len(batches) > 1:
                for batch in batches:
                    self.admit([batch])
                return
            log.exception("batch %s could not join the running batches", batches[0].batch_id)
            self._send(_failed(batches[0].batch_id, exc))
            return
        now = self._clock()
        for batch, slots in zip(batches, admitted, strict=True):
            self._running.append(_Running(batch, slots, now))
            self._send(Started(batch.batch_id))

    def cancel(self, batch_ids: set[int]) -> None:
        """Canceled batches leave now, their images undrawn."""
        for running in [r for r in self._running if r.batch.batch_id in batch_ids]:
            self._running.remove(running)
            self._finish(running.batch, None, self._clock() - running.admitted, running.shared_images)

    def step(self) -> None:
        """One model call for every slot; a ``Step`` for each batch; the batches whose
        steps are done are decoded and leave."""
        try:
            self._stepper.step([r.slots for r in self._running])
        except DeviceLost:
            raise
        except Exception as exc:
            images = self.images
            failed, self._running = self._running, []
            log.exception("a step of %d batch(es) failed", len(failed))
            for running in failed:
                self._send(replace(_failed(running.batch.batch_id, exc), call_images=images))
            return
        images = self.images
        for running in self._running:
            running.stepped_images += images
            self._send(Step(running.batch.batch_id, running.slots.step_index, running.slots.steps))
        finished = [r for r in self._running if r.slots.done]
        if finished:
            self._running = [r for r in self._running if not r.slots.done]
            self._leave(finished)

    def _leave(self, finished: list[_Running]) -> None:
        """Decode the finished batches in one call and deliver each; if that fails, each
        is decoded alone, so only a batch at fault fails."""
        try:
            images = self._stepper.decode([r.slots for r in finished])
        except DeviceLost:
            raise
        except Exception as exc:
            if len(finished) > 1:
                for running in finished:
                    self._leave([running])
                return
            log.exception("batch %s could not be decoded", finished[0].batch.batch_id)
            self._send(_failed(finished[0].batch.batch_id, exc))
            return
        now = self._clock()
        for running, batch_images in zip(finished, images, strict=True):
            self._finish(running.batch, batch_images, now - running.admitted, running.shared_images)


def _failed(batch_id: int, exc: Exception) -> Failed:
    message = exc.message if isinstance(exc, FleetError) else f"{type(exc).__name__}: {exc}"
    return Failed(batch_id, message, out_of_memory=isinstance(exc, ModelOutOfMemory))
