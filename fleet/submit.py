"""``fleet submit PROMPT``: images from a running fleet, from a terminal.

Submits the job, follows its event stream (a progress bar over the denoising steps, the
place in line while it waits; no polling), saves the images under ``-o`` and prints their
paths. Ctrl-C while it waits cancels the job, so an abandoned job does not take a GPU; a
second Ctrl-C quits at once (the job may then still run). Exit status: 0 the images are
saved; 1 the API refused the job, could not be reached, or the job failed or was canceled;
130 interrupted.

How Ctrl-C works, and why: the submission (the POST, the event stream, the downloads) runs
in a thread of its own, and the main thread only waits for it or for Ctrl-C, whose handler
records the press and nothing else (``fleet.interrupts``). On a press the main thread cancels
the job with a client of its own, every request of it bounded. It used to be a
``KeyboardInterrupt`` raised wherever the main thread was, and inside urllib3, tqdm or the
import system it was sometimes swallowed: the command then followed a job that would never
run, and never exited (issue 22).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

import requests
from tqdm import tqdm

from fleet.client import FleetAPIError, FleetClient, StateEvent
from fleet.interrupts import Interrupts
from tasks.jobs import JobState
from tasks.settings import ClientSettings
from tasks.views import JobView

INTERRUPTED = 130
#: The cancel after Ctrl-C: its connect and read timeouts, and no retry. The user waits on it.
CANCEL_TIMEOUT_S = 10.0
#: After the cancel, how long the submission's thread gets to see the API end its stream
#: (with the job's CANCELED state) and close its bar, before the command exits without it.
STREAM_END_GRACE_S = 5.0


def run(args: argparse.Namespace) -> int:
    submission = _Submission(args)
    with Interrupts(signal.SIGINT, on_repeat=lambda _: _quit_now(submission)) as ctrl_c:
        submission.ctrl_c = ctrl_c
        submission.start()
        while not submission.finished and not ctrl_c.received:
            ctrl_c.wait()
        # A Ctrl-C in the same instant as the end does not undo what was done.
        if submission.finished:
            return submission.exit_status()
        return _interrupted(submission, ctrl_c)


class _Submission(threading.Thread):
    """``fleet submit`` but for Ctrl-C: its exit status, or the error it raised. A daemon:
    after Ctrl-C the command may exit while it still waits on the API."""

    def __init__(self, args: argparse.Namespace):
        super().__init__(name="submission", daemon=True)
        self.args = args
        settings = ClientSettings()
        self.api = args.api or settings.base_url
        self.api_key = settings.api_key or None
        self.job_id: str | None = None
        self.finished = False
        self.ctrl_c: Interrupts | None = None
        self._status: int | None = None
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            self._status = self._run()
        except BaseException as exc:  # re-raised in the main thread, as a bug's traceback
            self._error = exc
        finally:
            self.finished = True
            self._wake()

    def exit_status(self) -> int:
        if self._error is not None:
            raise self._error
        assert self._status is not None
        return self._status

    @property
    def interrupted(self) -> bool:
        """Ctrl-C was pressed: the main thread cancels the job, and what this thread then
        sees (the job CANCELED, its stream cut) is no news to report."""
        return bool(self.ctrl_c and self.ctrl_c.received)

    def submitted(self, job: JobView) -> None:
        self.job_id = job.id
        self._wake()

    def _wake(self) -> None:
        if self.ctrl_c is not None:
            self.ctrl_c.wake()

    def _run(self) -> int:
        try:
            with FleetClient(self.api, api_key=self.api_key) as client:
                return _submit(client, self.args, self)
        except FleetAPIError as exc:
            return INTERRUPTED if self.interrupted else _fail(str(exc))
        except requests.RequestException as exc:
            return INTERRUPTED if self.interrupted else _fail(f"cannot reach the API at {self.api}: {exc}")


def _interrupted(submission: _Submission, ctrl_c: Interrupts) -> int:
    if submission.job_id is None:
        _say("interrupted: the job is canceled once the API has answered its submission (Ctrl-C again to quit now)")
        while submission.job_id is None and not submission.finished:
            ctrl_c.wait()
        if submission.job_id is None:  # the API did not take it: nothing to cancel
            return INTERRUPTED
    with FleetClient(submission.api, api_key=submission.api_key, timeout_s=CANCEL_TIMEOUT_S, retries=0) as client:
        status = _cancel(client, submission.job_id)
    submission.join(STREAM_END_GRACE_S)
    return status


def _quit_now(submission: _Submission) -> None:
    """The second Ctrl-C, in the signal handler: no lock, no buffered stream, no cleanup."""
    job = f"job {submission.job_id} may still run" if submission.job_id else "the job may still run"
    os.write(sys.stderr.fileno(), f"\nfleet submit: interrupted again: quitting; {job}\n".encode())
    os._exit(INTERRUPTED)


def _submit(client: FleetClient, args: argparse.Namespace, submission: _Submission) -> int:
    job = client.submit(
        args.prompt,
        model=args.model,
        loras=dict(args.lora) if args.lora else None,
        negative_prompt=args.negative_prompt,
        width=args.width,
        height=args.height,
        steps=args.steps,
        scheduler=args.scheduler,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        num_images=args.num_images,
        output_format=args.format,
        service_class=args.service_class,
    )
    submission.submitted(job)
    if args.no_wait:
        print(job.id)
        url = f"{client.base_url}/v1/jobs/{job.id}"
        _say(f"job {job.id} is {job.state.value}; wait for it: curl -H 'Prefer: wait=60' {url}")
        return 0
    _say(f"job {job.id} submitted")
    job = _follow(client, job)
    if submission.interrupted:
        return INTERRUPTED
    if job.state is not JobState.SUCCEEDED:
        return _fail(f"job {job.id} {job.state.value}: {job.error or 'no reason given'}")
    for path in client.download(job, args.output):
        print(path)
    return 0


def _follow(client: FleetClient, job: JobView) -> JobView:
    """The job once it ended, drawn as it goes (the bar shows only on a terminal)."""
    with tqdm(total=job.request.steps, unit="step", desc=f"job {job.id[:8]}", file=sys.stderr, disable=None) as bar:
        for event in client.stream(job.id):
            # Steps of the job's current model call (a job split over two calls counts twice).
            if isinstance(event, StateEvent):
                job = event.job
                bar.set_postfix_str(_status(job), refresh=False)
                if job.progress:
                    bar.total, bar.n = job.progress.total, job.progress.step
            else:
                bar.total, bar.n = event.total, event.step
            bar.refresh()
    # The stream ends with the job's last state, unless the connection broke first.
    return job if job.state.terminal else client.wait(job.id)


def _status(job: JobView) -> str:
    place = job.place_in_line
    if job.state is not JobState.QUEUED or place is None:
        return job.state.value.lower()
    status = f"queued, {place.position} ahead"
    if place.estimated_start_at is not None:
        status += f", starts ~{place.estimated_start_at.astimezone():%H:%M:%S}"
    return status


def _cancel(client: FleetClient, job_id: str) -> int:
    _say(f"interrupted: canceling job {job_id}")
    try:
        client.cancel(job_id)
        _say(f"canceled job {job_id}")
    except FleetAPIError as exc:
        _say(f"job {job_id} was not canceled: {exc.message}")
    except requests.RequestException as exc:
        _say(f"job {job_id} was not canceled (the API did not answer: {exc})")
    return INTERRUPTED


def _fail(message: str) -> int:
    _say(f"fleet submit: {message}")
    return 1


def _say(message: str) -> None:
    """Everything but the saved paths goes to stderr: stdout stays a list of files."""
    print(message, file=sys.stderr, flush=True)
