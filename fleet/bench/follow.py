"""How a load client follows a job to its end: it waits (``Prefer: wait``), streams its
events, or polls it every N seconds.

Waiting and streaming are what clients should do, and what the load generator does by
default. Polling is here only to measure what it costs the fleet: each status read takes
CPU from the machine the model runs on (``fleet bench batching --follow poll:0.025``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from fleet.client import FleetClient, StateEvent
from tasks.views import JobView

FollowMode = Literal["wait", "stream", "poll"]


@dataclass(frozen=True)
class Follow:
    mode: FollowMode = "wait"
    interval_s: float | None = None  # poll: between one answer and the next request

    def __post_init__(self):
        if (self.mode == "poll") != (self.interval_s is not None and self.interval_s > 0):
            raise ValueError("follow: 'wait', 'stream' or 'poll:SECONDS' (a positive interval)")

    @classmethod
    def parse(cls, text: str) -> Follow:
        """``wait``, ``stream`` or ``poll:0.025``."""
        name, _, interval = text.partition(":")
        modes: dict[str, FollowMode] = {"wait": "wait", "stream": "stream", "poll": "poll"}
        mode = modes.get(name)
        if mode is None:
            raise ValueError(f"follow '{text}': expected wait, stream or poll:SECONDS")
        try:
            return cls(mode, float(interval) if interval else None)
        except ValueError:
            raise ValueError(f"follow '{text}': expected wait, stream or poll:SECONDS") from None

    def __str__(self) -> str:
        return f"poll:{self.interval_s:g}" if self.mode == "poll" else self.mode

    @property
    def label(self) -> str:
        if self.mode == "poll":
            assert self.interval_s is not None
            every = f"{self.interval_s * 1000:g} ms" if self.interval_s < 1 else f"{self.interval_s:g} s"
            return f"polls every {every}"
        return "waits" if self.mode == "wait" else "streams"

    def submit(self, client: FleetClient, body: dict, timeout_s: float) -> JobView:
        """Send the job: a waiting client holds the submission itself until the job ends
        (one request per job when it ends within 60 s)."""
        return client.submit(**body, wait_s=timeout_s if self.mode == "wait" else None)

    def until_done(self, client: FleetClient, job: JobView, timeout_s: float) -> JobView:
        """The job once it ended, or as it was when ``timeout_s`` ran out."""
        if job.state.terminal:
            return job
        if self.mode == "wait":
            return client.wait(job.id, timeout_s)
        if self.mode == "stream":
            for event in client.stream(job.id, timeout_s):
                if isinstance(event, StateEvent):
                    job = event.job
            return job
        deadline = time.monotonic() + timeout_s
        while not job.state.terminal and time.monotonic() < deadline:
            time.sleep(self.interval_s or 0)
            job = client.get(job.id)
        return job
