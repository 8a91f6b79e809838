"""The model thread: the one thread that loads, warms and runs the model.

Task threads hand work to ``ModelRunner.submit`` and wait on the returned future; the
model thread takes work in arrival order and runs it. Torch is never touched from any
other thread (two thread teams fighting over the cores make every call ~2x slower).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Protocol

from PIL import Image

from workers.pipeline import CompatKey, ImageWork

log = logging.getLogger(__name__)


class Model(Protocol):
    name: str

    def run(self, key: CompatKey, images: list[ImageWork]) -> list[Image.Image]: ...

    def warm(self, width: int, height: int) -> None: ...


@dataclass(frozen=True)
class BatchResult:
    images: list[Image.Image]
    batch_id: str
    batch_images: int  # images in the pipeline call this work ran in
    batch_wait_s: float  # from submit until the call started
    inference_s: float


@dataclass
class _Work:
    key: CompatKey
    images: list[ImageWork]
    submitted: float
    future: Future


class ModelRunner:
    def __init__(self, load_model: Callable[[], Model], warm_size: tuple[int, int], clock=time.monotonic):
        self._load_model = load_model
        self._warm_size = warm_size
        self._clock = clock
        self._inbox: queue.Queue[_Work | None] = queue.Queue()
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="model", daemon=True)
        self._batch_ids = itertools.count(1)
        self.model_name = ""

    def start(self, timeout_s: float | None = None) -> None:
        """Start the model thread and block until the model is loaded and warm."""
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError("the model did not load in time")
        if self._load_error is not None:
            raise RuntimeError(f"the model failed to load: {self._load_error}") from self._load_error

    def submit(self, key: CompatKey, images: list[ImageWork]) -> Future:
        work = _Work(key, images, self._clock(), Future())
        self._inbox.put(work)
        return work.future

    def stop(self, timeout_s: float = 30) -> None:
        self._inbox.put(None)
        self._thread.join(timeout_s)

    def _main(self) -> None:
        try:
            model = self._load_model()
            model.warm(*self._warm_size)
            self.model_name = model.name
        except BaseException as exc:  # surfaced to start()
            self._load_error = exc
            self._ready.set()
            return
        self._ready.set()
        while (work := self._inbox.get()) is not None:
            if not work.future.set_running_or_notify_cancel():
                continue
            started = self._clock()
            try:
                images = model.run(work.key, work.images)
            except BaseException as exc:
                work.future.set_exception(exc)
                continue
            finished = self._clock()
            work.future.set_result(
                BatchResult(
                    images=images,
                    batch_id=f"{threading.get_native_id()}-{next(self._batch_ids)}",
                    batch_images=len(work.images),
                    batch_wait_s=started - work.submitted,
                    inference_s=finished - started,
                )
            )
