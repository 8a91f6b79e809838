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
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from pathlib import Path
from typing import Protocol

import numpy as np

from tasks.errors import DeviceLost, FleetError, ModelOutOfMemory
from tasks.logs import configure_logging
from tasks.settings import WarmShape
from workers.work import CompatKey, ImageWork, Model

log = logging.getLogger(__name__)

#: The engine exits with this after a device error that leaves the device unusable (a
#: CUDA error poisons the context): only a fresh process can use the device again.
EXIT_DEVICE_LOST = 3
EXIT_LOAD_FAILED = 4


@dataclass(frozen=True)
class EngineConfig:
    model_ref: str
    device: str = "auto"
    dtype: str = "auto"
    warm: tuple[WarmShape, ...] = ()
    compile: str = "off"  # off | reduce-overhead | max-autotune | default
    compile_cache_dir: str = ""
    #: Environment set in the engine before torch is imported (device pinning).
    env: tuple[tuple[str, str], ...] = ()
    log_format: str = "text"  # FLEET_LOG_FORMAT

    def environment(self) -> dict[str, str]:
        """What the engine sets before torch is imported: ``env``, and in compiled mode the
        compilers' caches (read once, when the compilers load)."""
        environment = dict(self.env)
        if self.compile != "off":
            environment |= {"TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}
            if self.compile_cache_dir:
                environment["TORCHINDUCTOR_CACHE_DIR"] = str(Path(self.compile_cache_dir) / "inductor")
                environment["TRITON_CACHE_DIR"] = str(Path(self.compile_cache_dir) / "triton")
        return environment


# -- worker -> engine ---------------------------------------------------------------------
@dataclass(frozen=True)
class RunBatch:
    batch_id: int
    key: CompatKey
    work: tuple[ImageWork, ...]
    output: str = ""  # shared-memory block for the images; "" sends them in ``Done``


@dataclass(frozen=True)
class CancelBatch:
    """Stop this batch at its next step boundary (or never start it)."""

    batch_id: int


@dataclass(frozen=True)
class Stop:
    """Finish the batches already sent, then exit."""


# -- engine -> worker ---------------------------------------------------------------------
@dataclass(frozen=True)
class Ready:
    model_name: str
    pid: int
    load_s: float
    warm_s: float
    warmed: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoadFailed:
    error: str


@dataclass(frozen=True)
class Started:
    batch_id: int


@dataclass(frozen=True)
class Step:
    batch_id: int
    step: int
    total: int


@dataclass(frozen=True)
class Done:
    batch_id: int
    inference_s: float
    canceled: bool = False
    images: np.ndarray | None = field(default=None, repr=False)  # only when not in shared memory
    #: GPU bytes (allocated, reserved, peak during the call) when the model reports them.
    memory: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class Failed:
    batch_id: int
    error: str
    out_of_memory: bool = False


class Inbox(Protocol):
    def poll(self) -> bool: ...

    def recv(self) -> object:
        """The next message; raises ``EOFError`` once the worker has gone."""
        ...


def image_bytes(key: CompatKey, images: int) -> int:
    return images * key.height * key.width * 3


def images_view(buffer, batch: RunBatch) -> np.ndarray:
    return np.ndarray((len(batch.work), batch.key.height, batch.key.width, 3), dtype=np.uint8, buffer=buffer)


class EngineCore:
    """Load and warm the model, then run batches from the inbox until told to stop."""

    def __init__(
        self,
        config: EngineConfig,
        inbox: Inbox,
        send: Callable[[object], None],
        load: Callable[[EngineConfig], Model] | None = None,
    ):
        self._config = config
        self._inbox = inbox
        self._send = send
        self._load = load or _load_model
        self._queue: deque[RunBatch] = deque()
        self._canceled: set[int] = set()
        self._stopping = False
        self._model: Model | None = None

    def run(self) -> int:
        """Returns the exit code: 0 after ``Stop`` or the worker going away."""
        try:
            started = time.perf_counter()
            model = self._load(self._config)
            loaded = time.perf_counter()
            for shape in self._config.warm:
                model.warm(shape)
            warm_s = time.perf_counter() - loaded
        except BaseException as exc:
            log.exception("the engine could not load or warm the model")
            self._send(LoadFailed(f"{type(exc).__name__}: {exc}"))
            return EXIT_LOAD_FAILED
        self._model = model
        log.info("model %s loaded in %.1fs, warm in %.1fs (pid %s)", model.name, loaded - started, warm_s, os.getpid())
        self._send(Ready(model.name, os.getpid(), loaded - started, warm_s, tuple(map(str, self._config.warm))))
        while (batch := self._next()) is not None:
            try:
                self._run(batch)
            except DeviceLost as exc:
                log.critical("the device is lost (%s): the engine exits so a new one can start", exc.message)
                return EXIT_DEVICE_LOST
        return 0

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
                message = self._inbox.recv()
                if isinstance(message, RunBatch):
                    self._queue.append(message)
                elif isinstance(message, CancelBatch):
                    self._canceled.add(message.batch_id)
                elif isinstance(message, Stop):
                    self._stopping = True
        except (EOFError, OSError):
            self._stopping = True
            return False
        return True

    # -- one batch ------------------------------------------------------------------------
    def _run(self, batch: RunBatch) -> None:
        if batch.batch_id in self._canceled:
            self._canceled.discard(batch.batch_id)
            self._send(Done(batch.batch_id, 0.0, canceled=True))
            return
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
            images = self._model.run(batch.key, list(batch.work), on_step)
        except DeviceLost:
            raise
        except ModelOutOfMemory as exc:
            self._send(Failed(batch.batch_id, exc.message, out_of_memory=True))
            return
        except Exception as exc:
            message = exc.message if isinstance(exc, FleetError) else f"{type(exc).__name__}: {exc}"
            self._send(Failed(batch.batch_id, message))
            return
        finally:
            self._canceled.discard(batch.batch_id)
        inference_s = time.perf_counter() - started
        memory = self._memory_stats()
        self._send(Done(batch.batch_id, inference_s, canceled, images=_deliver(batch, images), memory=memory))

    def _memory_stats(self) -> tuple[int, int, int] | None:
        stats = getattr(self._model, "memory_stats", None)
        if stats is None:
            return None
        try:
            return stats()
        except Exception:  # a metric must never fail a batch
            log.exception("could not read the device's memory")
            return None


def _deliver(batch: RunBatch, images: np.ndarray) -> np.ndarray | None:
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
def serve(conn, config: EngineConfig, worker_pid: int) -> None:
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
