"""Helpers the tests share: the HTTP client side of a job, and a fake model and engine for
the runner and the engine loop."""

from __future__ import annotations

import json
import queue
import threading
import time
from typing import IO

import numpy as np
import requests

from tasks.errors import ModelOutOfMemory
from tasks.keys import DEV_KEY
from workers.engine_client import ThreadEngine
from workers.protocol import EngineConfig, ModelSpec

#: Calls to the API, with the local development key.
http = requests.Session()
http.headers["Authorization"] = f"Bearer {DEV_KEY}"


def submit(api_url: str, **body) -> str:
    response = http.post(f"{api_url}/v1/jobs", json=body, timeout=10)
    assert response.status_code == 202, response.text
    assert response.headers["Location"].endswith(response.json()["id"])
    return response.json()["id"]


TERMINAL = ("SUCCEEDED", "FAILED", "CANCELED")


def wait_done(api_url: str, job_id: str, timeout_s: float = 120) -> dict:
    """The job once it ended: the API holds each GET until then (``Prefer: wait``)."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        wait = f"wait={min(60, max(1, int(left)))}"
        job = http.get(f"{api_url}/v1/jobs/{job_id}", headers={"Prefer": wait}, timeout=70).json()
        if job["state"] in TERMINAL:
            return job
    raise TimeoutError(f"job {job_id} still {job['state']} after {timeout_s}s")


def sse(response: requests.Response):
    """The (event, data) pairs of a Server-Sent Events response, as they arrive."""
    name, data = "message", []
    for line in response.iter_lines(decode_unicode=True):
        if line == "":
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


class Lines:
    """A child process's pipe read line by line in a thread of its own, so that a test
    waits for a line with a bound: a line that never comes fails the test with what the
    child did say, instead of hanging it (``pipe.readline()`` waits forever)."""

    def __init__(self, pipe: IO[str]):
        self.seen: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(pipe,), daemon=True).start()

    def _pump(self, pipe: IO[str]) -> None:
        for line in pipe:
            self._lines.put(line)
        self._lines.put(None)

    def next(self, timeout_s: float, what: str) -> str:
        """The next line, expected to be ``what`` (for the failure's message)."""
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"no {what} after {timeout_s} s; it said: {self.text()!r}") from None
        if line is None:
            raise AssertionError(f"the pipe closed before {what}; it said: {self.text()!r}")
        self.seen.append(line)
        return line

    def rest(self, timeout_s: float) -> str:
        """Every line until the pipe closes (the child exited), then all it said."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                return self.text()
            self.seen.append(line)
        raise AssertionError(f"the pipe still open after {timeout_s} s; it said: {self.text()!r}")

    def text(self) -> str:
        return "".join(self.seen)


def download(job: dict) -> list[bytes]:
    blobs = []
    for image in job["images"]:
        response = requests.get(image["url"], timeout=10)
        assert response.status_code == 200
        blobs.append(response.content)
    return blobs


class ModelStub:
    """What a fake model has of the ``Model`` protocol beyond its calls: no device memory,
    no weights, nothing to release or warm, no step-level loop."""

    batching = "request"

    def memory_stats(self):
        return None

    def weight_bytes(self):
        return 0

    def release(self):
        pass

    def warm(self, shape):
        pass

    def stepper(self, key):
        return None


class FakeModel(ModelStub):
    """Sleeps a little per call; fails on a poison prompt or above a memory limit."""

    name = "fake"

    def __init__(self, fail_on: str | None = None, memory_images: int = 1000, call_s: float = 0.02):
        self.threads: set[int] = set()
        self.calls: list[list[str]] = []
        self.fail_on = fail_on
        self.memory_images = memory_images
        self.call_s = call_s
        self.steps_run = 0

    def warm(self, shape):
        self.threads.add(threading.get_ident())
        self.warmed = shape

    def run(self, key, images, on_step=None):
        self.threads.add(threading.get_ident())
        self.calls.append([w.prompt for w in images])
        for step in range(1, key.steps + 1):  # the call's time spread over its steps
            time.sleep(self.call_s / key.steps)
            self.steps_run += 1
            if on_step is not None and on_step(step, key.steps):
                break
        if len(images) > self.memory_images:
            raise ModelOutOfMemory(f"{len(images)} images do not fit")
        if any(w.prompt == self.fail_on for w in images):
            raise ValueError("bad prompt")
        out = np.zeros((len(images), key.height, key.width, 3), dtype=np.uint8)
        out[:, :, :, 0] = np.array([w.seed % 256 for w in images], dtype=np.uint8)[:, None, None]
        return out


def fake_engine(model, serves: str = "") -> ThreadEngine:
    """An in-process engine around an already-built model, serving it as ``serves`` (the
    registry's name jobs carry; "": the model's own name)."""
    return ThreadEngine(EngineConfig((ModelSpec(model.name, name=serves),)), load=lambda _config: model)
