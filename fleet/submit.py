"""``fleet submit PROMPT``: images from a running fleet, from a terminal.

Submits the job, follows its event stream (a progress bar over the denoising steps, the
place in line while it waits; no polling), saves the images under ``-o`` and prints their
paths. Ctrl-C while it waits cancels the job, so an abandoned job does not take a GPU.
Exit status: 0 the images are saved; 1 the API refused the job, could not be reached, or
the job failed or was canceled; 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

import requests
from tqdm import tqdm

from fleet.client import FleetAPIError, FleetClient, StateEvent
from tasks.jobs import JobState
from tasks.settings import ClientSettings
from tasks.views import JobView

INTERRUPTED = 130


def run(args: argparse.Namespace) -> int:
    settings = ClientSettings()
    api = args.api or settings.base_url
    try:
        with FleetClient(api, api_key=settings.api_key or None) as client:
            return _submit(client, args)
    except FleetAPIError as exc:
        return _fail(str(exc))
    except requests.RequestException as exc:
        return _fail(f"cannot reach the API at {api}: {exc}")
    except KeyboardInterrupt:
        _say("interrupted")
        return INTERRUPTED


def _submit(client: FleetClient, args: argparse.Namespace) -> int:
    job = client.submit(
        args.prompt,
        negative_prompt=args.negative_prompt,
        width=args.width,
        height=args.height,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        num_images=args.num_images,
        output_format=args.format,
        service_class=args.service_class,
    )
    if args.no_wait:
        print(job.id)
        url = f"{client.base_url}/v1/jobs/{job.id}"
        _say(f"job {job.id} is {job.state.value}; wait for it: curl -H 'Prefer: wait=60' {url}")
        return 0
    try:
        _say(f"job {job.id} submitted")
        job = _follow(client, job)
    except KeyboardInterrupt:
        return _cancel(client, job.id)
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
