"""The worker's side of the engine: start it, send it batches, turn its messages into
events for the runner, and notice at once when it dies.

``ProcessEngine`` spawns ``workers.engine.serve`` (spawn, never fork: the worker process
must not have touched torch, and the engine is the only process that does) and talks to
it over a pipe. Each batch's images come back through a shared-memory block the worker
allocates before sending the batch and frees once it has copied them out. A reader thread
waits on the pipe and on the process's sentinel together, so the engine's death (kill -9,
a segfault, the OOM killer, a device error it exits on) is seen within milliseconds; the
runner then returns the waiting batches to the batcher, fails the one that was running
(its jobs follow the crash rules) and starts a new engine.

``ThreadEngine`` runs the same ``EngineCore`` on a thread of the worker process: the
earlier design, for comparison (``FLEET_ENGINE=thread``) and for unit tests with fake
models.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import Callable
from multiprocessing import shared_memory
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Protocol

from typing_extensions import assert_never

from tasks.errors import EngineStartFailed, UnknownMessage
from workers.engine import EXIT_DEVICE_LOST, EXIT_LOAD_FAILED, EXIT_PROTOCOL_ERROR, EngineCore, serve
from workers.protocol import (
    CancelBatch,
    Done,
    EngineConfig,
    Failed,
    FromEngine,
    Join,
    LoadFailed,
    Ready,
    RunBatch,
    Started,
    Step,
    Stop,
    Swapped,
    ToEngine,
    from_engine,
    image_bytes,
    images_view,
)
from workers.work import CompatKey, Images, ImageWork, Model

log = logging.getLogger(__name__)


class EngineEvents(Protocol):
    """What the runner hears from the engine, on the engine's reader thread."""

    def batch_started(self, batch_id: int) -> None: ...

    def batch_step(self, batch_id: int, step: int, total: int) -> None: ...

    def batch_done(
        self, batch_id: int, images: Images | None, inference_s: float, canceled: bool, shared_images: float = 0.0
    ) -> None:
        """``images`` is None when the call was canceled (or its images are gone)."""

    def batch_failed(self, batch_id: int, error: str, out_of_memory: bool, call_images: int = 0) -> None: ...

    def engine_died(self, reason: str) -> None: ...

    def model_swapped(self, swapped: Swapped) -> None:
        """The engine loaded another model for the next batch (and evicted others)."""

    def device_memory(self, allocated: int, reserved: int, peak: int) -> None:
        """GPU memory after a call (sent only by a model on CUDA)."""


class Engine(Protocol):
    def start(self, events: EngineEvents, timeout_s: float | None = None) -> Ready:
        """Start (or restart) the engine; returns once the model is loaded and warm.
        Raises ``EngineStartFailed``."""
        ...

    def submit(self, batch_id: int, key: CompatKey, work: list[ImageWork], join: Join | None = None) -> None:
        """Queue a batch: a call of its own, or (``join``) joining the running slots."""
        ...

    def cancel(self, batch_id: int) -> None: ...

    def stop(self, timeout_s: float = 60) -> None: ...


def exit_reason(code: int | None) -> str:
    if code is None:
        return "the engine stopped answering"
    if code < 0:
        name = signal.Signals(-code).name
        hint = {"SIGKILL": " (kill -9 or the OOM killer)", "SIGSEGV": " (a segfault)"}.get(name, "")
        return f"the engine was killed by {name}{hint}"
    if code == EXIT_DEVICE_LOST:
        return "the engine exited after a device error"
    if code == EXIT_PROTOCOL_ERROR:
        return "the engine exited after a message outside the engine protocol"
    return f"the engine exited with code {code}"


def dispatch(message: FromEngine, events: EngineEvents, images: Images | None = None) -> None:
    """Hand a message of a running engine to the runner. ``Ready`` and ``LoadFailed`` come
    only while it starts (``Engine.start`` reads them): later, they are a broken engine."""
    match message:
        case Step(batch_id=batch_id, step=step, total=total):
            events.batch_step(batch_id, step, total)
        case Started(batch_id=batch_id):
            events.batch_started(batch_id)
        case Swapped():
            events.model_swapped(message)
        case Done(batch_id=batch_id, inference_s=inference_s, canceled=canceled, memory=memory):
            if memory is not None:
                events.device_memory(*memory)
            events.batch_done(batch_id, images, inference_s, canceled, message.shared_images)
        case Failed(batch_id=batch_id, error=error, out_of_memory=out_of_memory):
            events.batch_failed(batch_id, error, out_of_memory, message.call_images)
        case Ready() | LoadFailed():
            raise UnknownMessage(f"the engine sent {type(message).__name__} after it had started")
        case _:
            assert_never(message)


def started(message: FromEngine) -> Ready:
    """The engine's first answer: ``Ready``, or ``EngineStartFailed``."""
    match message:
        case Ready():
            return message
        case LoadFailed(error=error):
            raise EngineStartFailed(f"the model failed to load: {error}")
        case Swapped() | Started() | Step() | Done() | Failed():
            raise EngineStartFailed(f"the engine sent {type(message).__name__} before it was ready")
        case _:
            assert_never(message)


class ProcessEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self._context = multiprocessing.get_context("spawn")
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._send_lock = threading.Lock()
        self._blocks: dict[int, tuple[shared_memory.SharedMemory, RunBatch]] = {}
        self._blocks_lock = threading.Lock()
        self._stopping = False
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, events: EngineEvents, timeout_s: float | None = None) -> Ready:
        self._free_blocks()
        self._stopping = False
        conn, child = self._context.Pipe(duplex=True)
        process = self._context.Process(target=serve, args=(child, self.config, os.getpid()), name="fleet-engine")
        process.daemon = True
        process.start()
        child.close()
        self._process, self._conn = process, conn
        ready = self._await_ready(conn, process, timeout_s)
        self._reader = threading.Thread(
            target=self._read, args=(conn, process, events), name="engine-reader", daemon=True
        )
        self._reader.start()
        return ready

    @staticmethod
    def _await_ready(conn: Connection, process: BaseProcess, timeout_s: float | None) -> Ready:
        if not wait([conn, process.sentinel], timeout_s):
            process.kill()
            raise EngineStartFailed(f"the model did not load and warm within {timeout_s}s")
        try:
            message = from_engine(conn.recv())
        except (EOFError, OSError):
            process.join(5)
            raise EngineStartFailed(f"the model did not load: {exit_reason(process.exitcode)}") from None
        except UnknownMessage as exc:
            process.kill()
            raise EngineStartFailed(exc.message) from exc
        try:
            return started(message)
        except EngineStartFailed:
            process.join(10)
            if process.is_alive():
                process.kill()
            raise

    def submit(self, batch_id: int, key: CompatKey, work: list[ImageWork], join: Join | None = None) -> None:
        block = shared_memory.SharedMemory(create=True, size=max(1, image_bytes(key, len(work))))
        batch = RunBatch(batch_id, key, tuple(work), output=block.name, join=join)
        with self._blocks_lock:
            self._blocks[batch_id] = (block, batch)
        self._send(batch)

    def cancel(self, batch_id: int) -> None:
        self._send(CancelBatch(batch_id))

    def _send(self, message: ToEngine) -> None:
        try:
            with self._send_lock:
                if self._conn is None:
                    raise OSError("the engine was never started")
                self._conn.send(message)
        except (OSError, ValueError) as exc:  # it died: the reader reports that
            log.warning("could not reach the engine: %s", exc)

    def stop(self, timeout_s: float = 60) -> None:
        """Let the engine finish what it was sent, then end it."""
        self._stopping = True
        process = self._process
        if process is None:
            return
        self._send(Stop())
        process.join(timeout_s)
        if process.is_alive():
            process.kill()
            process.join(5)
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(5)
        self._free_blocks()

    # -- the reader thread ---------------------------------------------------------------
    def _read(self, conn: Connection, process: BaseProcess, events: EngineEvents) -> None:
        while True:
            ready = wait([conn, process.sentinel])
            if conn in ready:
                try:
                    received = conn.recv()
                except (EOFError, OSError):
                    break
                self._handle(received, process, events)
            elif not conn.poll():
                break
        process.join(5)
        conn.close()
        if not self._stopping:
            reason = exit_reason(process.exitcode)
            log.error("%s (pid %s)", reason, process.pid)
            self._free_blocks()
            events.engine_died(reason)

    def _handle(self, received: object, process: BaseProcess, events: EngineEvents) -> None:
        try:
            message = from_engine(received)
            images = self._images(message)
            dispatch(message, events, images)
        except UnknownMessage as exc:
            # Never dropped: the batch it names fails (the runner retries it); one that names
            # none means the engine speaks another protocol: it is replaced.
            if exc.batch_id is not None and self._take_block(exc.batch_id) is not None:
                log.error("%s: batch %s fails", exc.message, exc.batch_id)
                events.batch_failed(exc.batch_id, exc.message, False)
            else:
                log.critical("%s: killing the engine for a new one", exc.message)
                process.kill()

    def _images(self, message: FromEngine) -> Images | None:
        """A finished batch's images, copied out of its shared-memory block, which is freed."""
        if not isinstance(message, (Done, Failed)):
            return None
        taken = self._take_block(message.batch_id)
        if taken is None:
            return None
        block, batch = taken
        images = None
        if isinstance(message, Done) and not message.canceled:
            view = images_view(block.buf, batch)
            images = view.copy()
            del view
        block.close()
        block.unlink()
        return images

    def _take_block(self, batch_id: int) -> tuple[shared_memory.SharedMemory, RunBatch] | None:
        with self._blocks_lock:
            return self._blocks.pop(batch_id, None)

    def _free_blocks(self) -> None:
        with self._blocks_lock:
            blocks, self._blocks = self._blocks, {}
        for block, _ in blocks.values():
            block.close()
            block.unlink()


class _QueueInbox:
    """The thread engine's inbox; ``None`` in the queue means the worker has gone."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[ToEngine | None] = queue.SimpleQueue()

    def poll(self) -> bool:
        return not self.queue.empty()

    def recv(self) -> object:
        message = self.queue.get()
        if message is None:
            raise EOFError
        return message


class ThreadEngine:
    """The engine loop on a thread of the worker process (no isolation, no shared memory).
    ``load`` replaces the model loader (a model built in-process)."""

    def __init__(self, config: EngineConfig, load: Callable[[EngineConfig], Model] | None = None):
        self.config = config
        self._load = load
        self._inbox = _QueueInbox()
        self._thread: threading.Thread | None = None

    def start(self, events: EngineEvents, timeout_s: float | None = None) -> Ready:
        os.environ.update(self.config.environment())  # this process is the engine's
        inbox = self._inbox = _QueueInbox()
        answer: queue.SimpleQueue[Ready | LoadFailed] = queue.SimpleQueue()

        def send(message: FromEngine) -> None:
            if isinstance(message, (Ready, LoadFailed)):
                answer.put(message)
            else:
                dispatch(message, events, message.images if isinstance(message, Done) else None)

        def main() -> None:
            code = EngineCore(self.config, inbox, send, load=self._load).run()
            if code not in (0, EXIT_LOAD_FAILED):
                events.engine_died(exit_reason(code))

        self._thread = threading.Thread(target=main, name="engine", daemon=True)
        self._thread.start()
        try:
            message = answer.get(timeout=timeout_s)
        except queue.Empty:
            raise EngineStartFailed(f"the model did not load and warm within {timeout_s}s") from None
        return started(message)

    def submit(self, batch_id: int, key: CompatKey, work: list[ImageWork], join: Join | None = None) -> None:
        self._inbox.queue.put(RunBatch(batch_id, key, tuple(work), join=join))

    def cancel(self, batch_id: int) -> None:
        self._inbox.queue.put(CancelBatch(batch_id))

    def stop(self, timeout_s: float = 60) -> None:
        self._inbox.queue.put(Stop())
        self._inbox.queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout_s)
