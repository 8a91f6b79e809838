"""The engine: the one place the model runs, batch after batch, and nothing else.

The worker process (Celery's consumer, task threads, PNG encoding, uploads, job-store
writes, events, metrics and the batcher) sends the engine batches as typed messages; the
engine loads and warms the model, runs each batch as one call and answers with typed
messages: ``Started``, ``Step`` at every step boundary, ``Done`` or ``Failed``. It runs
in a process of its own (``workers.engine_client.ProcessEngine``, started with spawn: never
forked from a process that touched torch), so no Python work of the worker's shares its
interpreter or its GIL: on a launch-bound GPU every microsecond the model's thread waits
for the GIL is a microsecond the GPU idles (DESIGN.md, "Measured on a GPU"). This is
Cog's split of its HTTP/runner side from the worker child, and vLLM V1's engine core moved
out of the API server process.

The worker keeps the next batch queued here while one runs: the engine reads its inbox at
every step boundary (so a cancel lands at the next step) and between calls, and starts
the next batch the moment the last one returns.

A batch sent with ``Join`` (a queue whose ``batching`` is "step") does not wait for the
running one to end: the engine runs such batches step by step on the model's own denoising
loop (``Model.stepper``, ``workers.stepping``), admits each newcomer at the next step
boundary and lets each leave when its own steps are done. A model with no such loop for the
batch (compiled, or a UNet the loop does not cover) runs it as a call.

Images leave as one ``(n, height, width, 3)`` uint8 array per batch, written into a
shared-memory block the worker allocated (``RunBatch.output``): no pickled PIL images.

``EngineCore`` is the loop itself. ``serve`` runs it as the engine process; the worker can
also run it on a thread of its own process (``FLEET_ENGINE=thread``, the earlier design,
kept to measure against).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from typing import Protocol

from typing_extensions import assert_never

from tasks.errors import DeviceLost, FleetError, ModelOutOfMemory, UnknownMessage
from tasks.logs import configure_logging
from workers.protocol import (
    CancelBatch,
    Done,
    EngineConfig,
    Failed,
    FromEngine,
    LoadFailed,
    Ready,
    RunBatch,
    Started,
    Step,
    Stop,
    Swapped,
    images_view,
    to_engine,
)
from workers.resident import ResidentModels
from workers.stepping import Finish, StepGroup
from workers.work import Images, Model

log = logging.getLogger(__name__)

#: The engine exits with this after a device error that leaves the device unusable (a
#: CUDA error poisons the context): only a fresh process can use the device again.
EXIT_DEVICE_LOST = 3
EXIT_LOAD_FAILED = 4
#: ... and with this after a message outside the protocol that names no batch: the worker
#: and the engine disagree on the protocol, so a fresh engine is the only safe answer.
EXIT_PROTOCOL_ERROR = 5


class Inbox(Protocol):
    def poll(self) -> bool: ...

    def recv(self) -> object:
        """The next message; raises ``EOFError`` once the worker has gone."""
        ...


class EngineCore:
    """Load and warm the first model, then run batches from the inbox until told to stop,
    loading another model when a batch names it (``workers.resident``). ``load`` loads the
    one model of the config it is given."""

    def __init__(
        self,
        config: EngineConfig,
        inbox: Inbox,
        send: Callable[[FromEngine], None],
        load: Callable[[EngineConfig], Model] | None = None,
    ):
        self._config = config
        self._inbox = inbox
        self._send = send
        self._load = load or _load_model
        self._queue: deque[RunBatch] = deque()
        self._canceled: set[int] = set()
        self._stopping = False
        self._protocol_error: UnknownMessage | None = None

    def run(self) -> int:
        """Returns the exit code: 0 after ``Stop`` or the worker going away."""
        config = self._config
        models = ResidentModels(
            config.models, config.memory_budget, lambda spec: self._load(replace(config, models=(spec,)))
        )
        try:
            model, loaded = models.get(config.model.key)
            assert loaded is not None
        except BaseException as exc:
            log.exception("the engine could not load or warm the model")
            self._send(LoadFailed(f"{type(exc).__name__}: {exc}"))
            return EXIT_LOAD_FAILED
        log.info("model %s ready (pid %s)", model.name, os.getpid())
        warmed = tuple(map(str, config.model.warm))
        self._send(Ready(config.model.key, os.getpid(), loaded.load_s, loaded.warm_s, warmed, loaded.batching))
        try:
            while (batch := self._next()) is not None:
                self._run(models, batch)
        except DeviceLost as exc:
            log.critical("the device is lost (%s): the engine exits so a new one can start", exc.message)
            return EXIT_DEVICE_LOST
        return 0 if self._protocol_error is None else EXIT_PROTOCOL_ERROR

    # -- inbox ----------------------------------------------------------------------------
    def _next(self) -> RunBatch | None:
        while not self._queue:
            if self._stopping or not self._receive(block=True):
                return None
        return self._queue.popleft()

    def _receive(self, block: bool) -> bool:
        """Take in what the worker sent; False once it has gone."""
        try:
            while block or self._inbox.poll():
                block = False
                self._take(self._inbox.recv())
        except (EOFError, OSError):
            self._stopping = True
            return False
        return True

    def _take(self, received: object) -> None:
        try:
            message = to_engine(received)
        except UnknownMessage as exc:
            if exc.batch_id is not None:  # that batch fails, and the runner retries it
                log.error("%s: batch %s fails", exc.message, exc.batch_id)
                self._send(Failed(exc.batch_id, exc.message))
            else:  # finish what was sent, then exit: the worker starts a new engine
                log.critical("%s: the engine exits after the batches it was sent", exc.message)
                self._protocol_error, self._stopping = exc, True
            return
        match message:
            case RunBatch():
                self._queue.append(message)
            case CancelBatch(batch_id=batch_id):
                self._canceled.add(batch_id)
            case Stop():
                self._stopping = True
            case _:
                assert_never(message)

    # -- one batch ------------------------------------------------------------------------
    def _run(self, models: ResidentModels, batch: RunBatch) -> None:
        if self._take_canceled(batch):
            return
        model = self._model(models, batch)
        if model is None:
            return
        try:
            stepper = model.stepper(batch.key) if batch.join is not None else None
        except DeviceLost:
            raise
        except Exception as exc:  # its adapters did not load, say
            self._send(Failed(batch.batch_id, _message(exc)))
            return
        if stepper is None:
            self._call(model, batch)
        else:
            finish: Finish = lambda done, images, seconds, shared: self._finish(  # noqa: E731
                model, done, images, seconds, shared_images=shared
            )
            self._run_group(StepGroup(stepper, batch.key, self._send, finish), batch)

    def _take_canceled(self, batch: RunBatch) -> bool:
        """A batch canceled before it started: it ends here, never run."""
        if batch.batch_id not in self._canceled:
            return False
        self._canceled.discard(batch.batch_id)
        self._send(Done(batch.batch_id, 0.0, canceled=True))
        return True

    def _model(self, models: ResidentModels, batch: RunBatch) -> Model | None:
        """The batch's model, loaded (``Swapped``) if it was not; None when it cannot be
        (the batch has failed)."""
        try:
            model, loaded = models.get(batch.key.model)
        except DeviceLost:
            raise
        except Exception as exc:
            log.exception("model %s could not be loaded", batch.key.model)
            self._send(Failed(batch.batch_id, f"model {batch.key.model} could not be loaded: {_message(exc)}"))
            return None
        if loaded is not None:
            self._send(
                Swapped(batch.batch_id, loaded.model, loaded.load_s, loaded.warm_s, loaded.resident, loaded.batching)
            )
        return model

    def _call(self, model: Model, batch: RunBatch) -> None:
        """Request-level: the batch as one model call of its own."""
        self._send(Started(batch.batch_id))
        canceled = False

        def on_step(step: int, total: int) -> bool:
            nonlocal canceled
            self._receive(block=False)
            self._send(Step(batch.batch_id, step, total))
            canceled = batch.batch_id in self._canceled
            return canceled

        started = time.perf_counter()
        try:
            images = model.run(batch.key, list(batch.work), on_step)
        except DeviceLost:
            raise
        except ModelOutOfMemory as exc:
            self._send(Failed(batch.batch_id, exc.message, out_of_memory=True))
            return
        except Exception as exc:
            self._send(Failed(batch.batch_id, _message(exc)))
            return
        finally:
            self._canceled.discard(batch.batch_id)
        self._finish(model, batch, images, time.perf_counter() - started, canceled)

    def _run_group(self, group: StepGroup, first: RunBatch) -> None:
        """Step-level: ``first`` and the batches that join it at step boundaries, step by
        step until none is left. A batch that cannot join waits, and so does every batch
        sent after it (the order the worker sent them in is kept)."""
        group.admit([first])
        while group:
            self._receive(block=False)
            group.cancel(self._canceled)  # each leaves through _finish, which forgets its cancel
            joining: list[RunBatch] = []
            while self._queue:
                head = self._queue[0]
                if not (head.batch_id in self._canceled or group.joinable(head, joining)):
                    break
                self._queue.popleft()
                if not self._take_canceled(head):
                    joining.append(head)
            if joining:
                group.admit(joining)
            if group:
                group.step()

    def _finish(
        self,
        model: Model,
        batch: RunBatch,
        images: Images | None,
        inference_s: float,
        canceled: bool = False,
        shared_images: float = 0.0,
    ) -> None:
        """The batch's ``Done``: its images delivered, or none (canceled)."""
        self._canceled.discard(batch.batch_id)
        if images is None:
            self._send(Done(batch.batch_id, inference_s, canceled=True, shared_images=shared_images))
            return
        memory = _memory_stats(model)
        delivered = _deliver(batch, images)
        self._send(Done(batch.batch_id, inference_s, canceled, delivered, memory, shared_images))


def _message(exc: Exception) -> str:
    return exc.message if isinstance(exc, FleetError) else f"{type(exc).__name__}: {exc}"


def _memory_stats(model: Model) -> tuple[int, int, int] | None:
    try:
        return model.memory_stats()
    except Exception:  # a metric must never fail a batch
        log.exception("could not read the device's memory")
        return None


def _deliver(batch: RunBatch, images: Images) -> Images | None:
    """Copy the images into the worker's shared-memory block, or hand the array over."""
    if not batch.output:
        return images
    block = shared_memory.SharedMemory(name=batch.output)
    try:
        view = images_view(block.buf, batch)
        view[...] = images
        del view
    finally:
        block.close()
    return None


def _load_model(config: EngineConfig) -> Model:
    from workers.backends import load_model

    return load_model(config)


# -- the engine process ---------------------------------------------------------------------
def serve(conn: Connection, config: EngineConfig, worker_pid: int) -> None:
    """The engine process's entry point (``multiprocessing`` spawn target)."""
    os.environ.update(config.environment())
    _die_with(worker_pid)
    # The worker decides when the engine stops: Ctrl-C reaches the whole process group and
    # a supervisor's SIGTERM must let the running batch finish (warm shutdown); the worker
    # then sends Stop or closes the pipe. If the worker itself dies, so does the engine.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(
        config.log_format, "engine", text_format="[%(asctime)s: %(levelname)s/engine %(process)d] %(message)s"
    )
    code = EngineCore(config, conn, conn.send).run()
    conn.close()
    sys.exit(code)


def _die_with(worker_pid: int) -> None:
    """Linux: the kernel kills the engine when the worker dies, even by SIGKILL, so an
    orphan never holds the GPU. Elsewhere the engine exits when its pipe closes."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            log.warning("could not tie the engine's life to the worker's")
    if os.getppid() != worker_pid:  # the worker died before that took effect
        os._exit(1)
