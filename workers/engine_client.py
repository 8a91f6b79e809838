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
from multiprocessing import shared_memory
from multiprocessing.connection import wait
from typing import Protocol

import numpy as np

from tasks.errors import EngineStartFailed
from workers.engine import (
    EXIT_DEVICE_LOST,
    EXIT_LOAD_FAILED,
    CancelBatch,
    Done,
    EngineConfig,
    EngineCore,
    Failed,
    LoadFailed,
    Ready,
    RunBatch,
    Started,
    Step,
    Stop,
    image_bytes,
    images_view,
    serve,
)
from workers.work import CompatKey, ImageWork, Model

log = logging.getLogger(__name__)


class EngineEvents(Protocol):
    """What the runner hears from the engine, on the engine's reader thread."""

    def batch_started(self, batch_id: int) -> None: ...

    def batch_step(self, batch_id: int, step: int, total: int) -> None: ...

    def batch_done(self, batch_id: int, images: np.ndarray, inference_s: float, canceled: bool) -> None: ...

    def batch_failed(self, batch_id: int, error: str, out_of_memory: bool) -> None: ...

    def engine_died(self, reason: str) -> None: ...

    def device_memory(self, allocated: int, reserved: int, peak: int) -> None:
        """GPU memory after a call (sent only by a model on CUDA)."""


class Engine(Protocol):
    def start(self, events: EngineEvents, timeout_s: float | None = None) -> Ready:
        """Start (or restart) the engine; returns once the model is loaded and warm.
        Raises ``EngineStartFailed``."""
        ...

    def submit(self, batch_id: int, key: CompatKey, work: list[ImageWork]) -> None: ...

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
    return f"the engine exited with code {code}"


def _dispatch(message: object, events: EngineEvents, images: np.ndarray | None = None) -> None:
    if isinstance(message, Step):
        events.batch_step(message.batch_id, message.step, message.total)
    elif isinstance(message, Started):
        events.batch_started(message.batch_id)
    elif isinstance(message, Done):
        if message.memory is not None:
            events.device_memory(*message.memory)
        events.batch_done(message.batch_id, images, message.inference_s, message.canceled)
    elif isinstance(message, Failed):
        events.batch_failed(message.batch_id, message.error, message.out_of_memory)


class ProcessEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self._context = multiprocessing.get_context("spawn")
        self._process = None
        self._conn = None
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
        ready = self._await_ready(timeout_s)
        self._reader = threading.Thread(target=self._read, args=(events,), name="engine-reader", daemon=True)
        self._reader.start()
        return ready

    def _await_ready(self, timeout_s: float | None) -> Ready:
        if not wait([self._conn, self._process.sentinel], timeout_s):
            self._process.kill()
            raise EngineStartFailed(f"the model did not load and warm within {timeout_s}s")
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            self._process.join(5)
            raise EngineStartFailed(f"the model did not load: {exit_reason(self._process.exitcode)}") from None
        if isinstance(message, LoadFailed):
            self._process.join(10)
            raise EngineStartFailed(f"the model failed to load: {message.error}")
        assert isinstance(message, Ready), message
        return message

    def submit(self, batch_id: int, key: CompatKey, work: list[ImageWork]) -> None:
        block = shared_memory.SharedMemory(create=True, size=max(1, image_bytes(key, len(work))))
        batch = RunBatch(batch_id, key, tuple(work), output=block.name)
        with self._blocks_lock:
            self._blocks[batch_id] = (block, batch)
        self._send(batch)

    def cancel(self, batch_id: int) -> None:
        self._send(CancelBatch(batch_id))

    def _send(self, message: object) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError) as exc:  # it died: the reader reports that
            log.warning("could not reach the engine: %s", exc)

    def stop(self, timeout_s: float = 60) -> None:
        """Let the engine finish what it was sent, then end it."""
        self._stopping = True
        if self._process is None:
            return
        self._send(Stop())
        self._process.join(timeout_s)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(5)
        self._free_blocks()

    def kill(self) -> None:
        """Kill the engine as the OOM killer would (tests)."""
        self._process.kill()

    # -- the reader thread ---------------------------------------------------------------
    def _read(self, events: EngineEvents) -> None:
        conn, process = self._conn, self._process
        while True:
            ready = wait([conn, process.sentinel])
            if conn in ready:
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    break
                self._handle(message, events)
            elif not conn.poll():
                break
        process.join(5)
        conn.close()
        if not self._stopping:
            reason = exit_reason(process.exitcode)
            log.error("%s (pid %s)", reason, process.pid)
            self._free_blocks()
            events.engine_died(reason)

    def _handle(self, message: object, events: EngineEvents) -> None:
        images = None
        if isinstance(message, (Done, Failed)):
            with self._blocks_lock:
                block, batch = self._blocks.pop(message.batch_id, (None, None))
            if block is not None:
                if isinstance(message, Done):
                    view = images_view(block.buf, batch)
                    images = view.copy()
                    del view
                block.close()
                block.unlink()
        _dispatch(message, events, images)

    def _free_blocks(self) -> None:
        with self._blocks_lock:
            blocks, self._blocks = self._blocks, {}
        for block, _ in blocks.values():
            block.close()
            block.unlink()


class _QueueInbox:
    def __init__(self) -> None:
        self.queue: queue.SimpleQueue = queue.SimpleQueue()

    def poll(self) -> bool:
        return not self.queue.empty()

    def recv(self) -> object:
        message = self.queue.get()
        if message is None:
            raise EOFError
        return message


class ThreadEngine:
    """The engine loop on a thread of the worker process (no isolation, no shared memory).
    ``load`` replaces the model loader (tests)."""

    def __init__(self, config: EngineConfig, load=None):
        self.config = config
        self._load = load
        self._inbox: _QueueInbox | None = None
        self._thread: threading.Thread | None = None

    def start(self, events: EngineEvents, timeout_s: float | None = None) -> Ready:
        os.environ.update(self.config.environment())  # this process is the engine's
        inbox = self._inbox = _QueueInbox()
        answer: queue.SimpleQueue = queue.SimpleQueue()

        def send(message: object) -> None:
            if isinstance(message, (Ready, LoadFailed)):
                answer.put(message)
            else:
                _dispatch(message, events, getattr(message, "images", None))

        def main() -> None:
            code = EngineCore(self.config, inbox, send, load=self._load).run()
            if code not in (0, EXIT_LOAD_FAILED):
                events.engine_died(exit_reason(code))

        self._thread = threading.Thread(target=main, name="model", daemon=True)
        self._thread.start()
        try:
            message = answer.get(timeout=timeout_s)
        except queue.Empty:
            raise EngineStartFailed(f"the model did not load and warm within {timeout_s}s") from None
        if isinstance(message, LoadFailed):
            raise EngineStartFailed(f"the model failed to load: {message.error}")
        return message

    def submit(self, batch_id: int, key: CompatKey, work: list[ImageWork]) -> None:
        self._inbox.queue.put(RunBatch(batch_id, key, tuple(work)))

    def cancel(self, batch_id: int) -> None:
        self._inbox.queue.put(CancelBatch(batch_id))

    def stop(self, timeout_s: float = 60) -> None:
        if self._inbox is not None:
            self._inbox.queue.put(Stop())
            self._inbox.queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout_s)


def fake_engine(model: Model) -> ThreadEngine:
    """An in-process engine around an already-built model (tests)."""
    return ThreadEngine(EngineConfig(model_ref=model.name), load=lambda _config: model)
