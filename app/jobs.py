"""The job routes.

- ``POST /v1/jobs`` accepts a job (202 + ``Location``); with ``Prefer: wait=N`` it holds
  the request until the job ends (200) or N seconds pass (202); ``Cancel-After`` cancels
  it if no model call has started it in time.
- ``GET /v1/jobs/<id>`` reports a job (with ``Prefer: wait=N``: once it ends, or after N s).
- ``GET /v1/jobs/<id>/events`` streams its state changes and progress as Server-Sent Events.
- ``POST /v1/jobs/<id>/cancel`` cancels it.

Waiting never polls: it sleeps on the process's one job-event subscription
(``tasks.events``). Under gunicorn's gevent worker (``fleet web``) a waiting request is a
greenlet, not a thread, so a thousand waiters cost memory, not the API's capacity.
"""

from __future__ import annotations

import json
import re
import time
from contextlib import nullcontext
from datetime import datetime, timezone

from flask import Blueprint, Response, jsonify, request, stream_with_context, url_for

from app.openapi import CANCEL_AFTER, JOB, JOB_ID, PREFER, errors, json_body, operation, response
from app.services import Services, services
from app.waiting import event_stream, parse_prefer_wait, wait_until_done
from tasks.cancel import cancel, cancel_if_overdue, parse_duration
from tasks.errors import MalformedBody, NotFound, UnsupportedMediaType
from tasks.jobs import Job, JobOptions, JobState, new_job_id, to_spec
from tasks.request import validate_request
from tasks.store import now
from tasks.submit import submit_job
from tasks.views import PlaceInLine, render
from tasks.webhooks import check_webhook_url

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")

_JOB_ID = re.compile(r"[0-9a-f]{32}")


@bp.post("")
@operation(
    "Submit an image-generation job",
    description="Accepts the job (202) and queues it; with `Prefer: wait=N`, answers 200 if it ends within N s.",
    parameters=[PREFER, CANCEL_AFTER],
    body=json_body("JobRequest", {"prompt": "a red bicycle at dawn", "width": 64, "height": 64, "seed": 5}),
    responses={
        200: response("It ended while the request waited", JOB, headers=("Location", "Preference-Applied")),
        202: response("Accepted; read it at Location", JOB, headers=("Location", "Preference-Applied")),
        **errors(400, 413, 415, 422, 503),
    },
)
def submit():
    svc = services()
    if request.mimetype and request.mimetype != "application/json":
        raise UnsupportedMediaType("send the job as application/json", field=None)
    try:
        body = json.loads(request.get_data(cache=False) or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedBody(f"the body is not valid JSON: {exc}") from None
    except RecursionError:  # arrays nested thousands deep fit in the body limit
        raise MalformedBody("the body is nested too deeply") from None
    job_request = validate_request(body, svc.settings)
    spec = to_spec(job_request, svc.settings)
    options = JobOptions.of(job_request, svc.settings)
    if options.webhook is not None:
        check_webhook_url(options.webhook, svc.settings)
    wait_s = parse_prefer_wait(request.headers.get("Prefer"))
    cancel_after = request.headers.get("Cancel-After")
    created = now()
    job = Job(
        id=new_job_id(),
        state=JobState.QUEUED,
        spec=spec,
        created_at=created,
        queue=svc.settings.queue_for(options.service_class),
        cancel_at=created + parse_duration(cancel_after) if cancel_after is not None else None,
        priority=options.priority,
        webhook=options.webhook,
        webhook_events=options.webhook_events,
    )
    # Subscribed before the job exists: its end cannot slip between submit and wait.
    with svc.events.watch(job.id) if wait_s else nullcontext() as events:
        submit_job(svc.store, svc.celery, svc.settings, job)
        if events is not None:
            job = wait_until_done(svc.store, job, events, wait_s)
    response = jsonify(job_view(job))
    response.headers["Location"] = url_for("jobs.status", job_id=job.id)
    response.status_code = 200 if job.state.terminal else 202
    if wait_s:
        response.headers["Preference-Applied"] = f"wait={wait_s:g}"
    return response


@bp.get("/<job_id>")
@operation(
    "A job: its state, timings and, once it succeeded, presigned image URLs",
    description="With `Prefer: wait=N`, answers once the job ends or N s pass.",
    parameters=[JOB_ID, PREFER],
    responses={200: response("The job", JOB, headers=("Preference-Applied",)), **errors(404, 422, 503)},
)
def status(job_id: str):
    svc = services()
    wait_s = parse_prefer_wait(request.headers.get("Prefer"))
    with svc.events.watch(job_id) if wait_s and _JOB_ID.fullmatch(job_id) else nullcontext() as events:
        job = find_job(svc, job_id)
        if events is not None:
            job = wait_until_done(svc.store, job, events, wait_s)
    response = jsonify(job_view(job))
    if wait_s:
        response.headers["Preference-Applied"] = f"wait={wait_s:g}"
    return response


@bp.get("/<job_id>/events")
@operation(
    "A job's changes as Server-Sent Events, until it ends",
    description=(
        "`state` events carry the whole job (as `GET /v1/jobs/{job_id}`) on each change of state, `progress` "
        'events `{"id", "step", "total"}` at each denoising step; the stream ends with the job. An `error` '
        "event (an Error) ends it early if the job store goes away."
    ),
    parameters=[JOB_ID],
    responses={
        200: response("The stream", {"type": "string"}, media="text/event-stream", headers=("Cache-Control",)),
        **errors(404, 503),
    },
)
def events(job_id: str):
    svc = services()
    job = find_job(svc, job_id)  # a 404 before the stream starts
    stream = event_stream(svc, job, lambda current: job_view(current))
    response = Response(stream_with_context(stream), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # nginx: pass events through at once
    return response


@bp.post("/<job_id>/cancel")
@operation(
    "Cancel a job",
    description="A queued job never runs; a running one stops at its next step. Canceling again changes nothing.",
    parameters=[JOB_ID],
    responses={200: response("The job, CANCELED", JOB), **errors(404, 409, 503)},
)
def cancel_job(job_id: str):
    svc = services()
    return jsonify(job_view(cancel(svc.store, find_job(svc, job_id))))


def find_job(svc: Services, job_id: str) -> Job:
    job = svc.store.get(job_id) if _JOB_ID.fullmatch(job_id) else None
    if job is None:
        raise NotFound(f"no job '{job_id}' (it may have expired)", field="job_id")
    return cancel_if_overdue(svc.store, job)


def job_view(job: Job) -> dict:
    svc = services()
    place = None
    if job.state is JobState.QUEUED:
        position, jobs_per_s = svc.store.place_in_line(job)
        if position is not None:
            start = time.time() + (position + 1) / jobs_per_s if jobs_per_s else None
            place = PlaceInLine(
                position=position,
                estimated_start_at=datetime.fromtimestamp(start, timezone.utc) if start else None,
            )
    return render(job, svc.storage, place)
