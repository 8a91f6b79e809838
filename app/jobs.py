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

import hashlib
import json
import logging
import math
import re
import time
from typing import Any

from flask import Blueprint, Response, jsonify, request, stream_with_context, url_for

from app.auth import admit_submission, owner, require_key
from app.logs import note_job
from app.metrics import job_accepted
from app.openapi import (
    CANCEL_AFTER,
    ERROR,
    IDEMPOTENCY_KEY,
    JOB,
    JOB_ID,
    LAST_EVENT_ID,
    PREFER,
    PROGRESS,
    errors,
    json_body,
    operation,
    response,
    sse_events,
)
from app.services import Services, services
from app.waiting import event_stream, parse_prefer_wait, wait_until_done
from tasks.cancel import cancel, cancel_if_overdue, parse_duration
from tasks.errors import (
    Conflict,
    FleetError,
    MalformedBody,
    ModelUnserved,
    NotFound,
    UnsupportedMediaType,
    ValidationFailed,
)
from tasks.jobs import Job, JobOptions, JobState, new_job_id, to_spec
from tasks.request import JobRequest, validate_request
from tasks.store import now
from tasks.submit import submit_job
from tasks.views import PlaceInLine, render
from tasks.webhooks import check_webhook_url

log = logging.getLogger(__name__)

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")
require_key(bp)

_JOB_ID = re.compile(r"[0-9a-f]{32}")
IDEMPOTENCY_KEY_PATTERN = re.compile(r"^[\x20-\x7e]{1,255}$")
DEFAULT_PAGE, MAX_PAGE = 50, 200
_SUBMITTED = ("Location", "Preference-Applied", "Idempotent-Replayed")
_PAGE = {
    "type": "object",
    "required": ["jobs", "next_cursor"],
    "properties": {
        "jobs": {"type": "array", "items": JOB},
        "next_cursor": {"type": ["string", "null"], "description": "Pass as `cursor` for the next page."},
    },
}
_LIST_PARAMETERS = [
    {"name": "state", "in": "query", "schema": {"enum": [s.value for s in JobState]}},
    {"name": "limit", "in": "query", "schema": {"type": "string", "pattern": "^(?:[1-9]|[1-9][0-9]|1[0-9][0-9]|200)$"}},
    {"name": "cursor", "in": "query", "schema": {"type": "string", "pattern": "^[0-9]+(?:\\.[0-9]+)?$"}},
]


@bp.post("")
@operation(
    "Submit an image-generation job",
    description="Accepts the job (202) and queues it; with `Prefer: wait=N`, answers 200 if it ends within N s.",
    parameters=[PREFER, CANCEL_AFTER, IDEMPOTENCY_KEY],
    body=json_body("JobRequest", {"prompt": "a red bicycle at dawn", "width": 64, "height": 64, "seed": 5}),
    responses={
        200: response("It ended while the request waited", JOB, headers=_SUBMITTED),
        202: response("Accepted; read it at Location", JOB, headers=_SUBMITTED),
        **errors(400, 409, 413, 415, 422, 503, idempotent=True),
    },
)
def submit():
    svc = services()
    body = parse_json_body()
    job_request = validate_request(body, svc.settings)
    wait_s = parse_prefer_wait(request.headers.get("Prefer"))
    cancel_after = request.headers.get("Cancel-After")
    cancel_after_s = parse_duration(cancel_after) if cancel_after is not None else None
    job, replayed = accept(svc, job_request, cancel_after_s, fingerprint=request_fingerprint(body, cancel_after))
    job = wait_for(svc, job, wait_s)
    response = jsonify(job_view(job))
    response.headers["Location"] = url_for("jobs.status", job_id=job.id)
    response.status_code = 200 if job.state.terminal else 202
    if wait_s:
        response.headers["Preference-Applied"] = f"wait={wait_s:g}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def parse_json_body() -> Any:
    """The request's body, parsed: 415 unless it is sent as JSON, 400 unless it parses."""
    if request.mimetype and request.mimetype != "application/json":
        raise UnsupportedMediaType("send the body as application/json", field=None)
    try:
        return json.loads(request.get_data(cache=False) or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedBody(f"the body is not valid JSON: {exc}") from None
    except RecursionError:  # arrays nested thousands deep fit in the body limit
        raise MalformedBody("the body is nested too deeply") from None


def accept(
    svc: Services, job_request: JobRequest, cancel_after_s: float | None = None, fingerprint: str = ""
) -> tuple[Job, bool]:
    """Admit and submit a validated request as the current key's job; with an
    ``Idempotency-Key``, the job that key made before (True: a replay)."""
    spec = to_spec(job_request, svc.settings)
    options = JobOptions.of(job_request, svc.settings)
    if options.webhook is not None:
        check_webhook_url(options.webhook, svc.settings)
    created = now()
    job = Job(
        id=new_job_id(),
        state=JobState.QUEUED,
        spec=spec,
        created_at=created,
        queue=svc.registry.queue(spec.model, options.service_class),
        cancel_at=created + cancel_after_s if cancel_after_s is not None else None,
        priority=options.priority,
        webhook=options.webhook,
        webhook_events=options.webhook_events,
        owner=owner(),
    )
    key = idempotency_key()
    if key is not None:
        earlier = svc.owners.claim_idempotency_key(job.owner, key, fingerprint, job.id, svc.settings.idempotency_ttl_s)
        if earlier is not None:
            replayed = _replay(svc, *earlier, fingerprint)
            note_job(replayed.id)
            return replayed, True
    try:
        if svc.settings.unserved_model == "reject" and not any(svc.store.live_workers([job.queue]).values()):
            raise ModelUnserved(spec.model)
        admit_submission(svc, job.owner)
        submit_job(svc.store, svc.celery, svc.settings, job)
    except FleetError:
        if key is not None:
            svc.owners.forget_idempotency_key(job.owner, key)  # nothing was made: a retry may
        raise
    note_job(job.id)
    job_accepted(job.queue)
    log.info("accepted job %s for %s on %s", job.id, job.owner, job.queue, extra={"queue": job.queue,
             "model": job.spec.model, "owner": job.owner, "images": job.spec.num_images,
             "priority": job.priority})  # fmt: skip
    return job, False


def wait_for(svc: Services, job: Job, wait_s: float | None) -> Job:
    """The job once it ends, or as it is after ``wait_s`` (None: as it is now)."""
    if not wait_s or job.state.terminal:
        return job
    with svc.events.watch(job.id) as events:
        return wait_until_done(svc.store, job, events, wait_s)


def idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not IDEMPOTENCY_KEY_PATTERN.match(key):
        raise ValidationFailed("'Idempotency-Key' must be 1 to 255 printable ASCII characters", "Idempotency-Key")
    return key


def request_fingerprint(body: object, *extra: str | None) -> str:
    """What makes two submissions the same request: the body (key order aside) and the
    headers that change the job."""
    canonical = json.dumps([body, *extra], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replay(svc: Services, fingerprint_then: str, job_id: str, fingerprint: str) -> Job:
    if fingerprint_then != fingerprint:
        raise ValidationFailed(
            "this Idempotency-Key was used with a different request: use a new key for a new job",
            "Idempotency-Key",
        )
    job = svc.store.get(job_id)
    if job is None:
        raise Conflict("a request with this Idempotency-Key is still being processed; retry", "Idempotency-Key")
    return job


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
    job = wait_for(svc, find_job(svc, job_id), wait_s)
    response = jsonify(job_view(job))
    if wait_s:
        response.headers["Preference-Applied"] = f"wait={wait_s:g}"
    return response


@bp.get("/<job_id>/events")
@operation(
    "A job's changes as Server-Sent Events, until it ends",
    description=(
        "`state` events carry the whole job (as `GET /v1/jobs/{job_id}`) on each change of state, and while it is "
        'QUEUED on each change of its place in line; `progress` events `{"id", "step", "total"}` at each '
        "denoising step; the stream ends with the job. An `error` event (an Error) ends it early if the job store "
        "goes away. Each event's `id` says how far the job had got (`RUNNING.12`: state and step); a client that "
        "reconnects with it as `Last-Event-ID` gets the job's current state first, and nothing more if it had "
        "already seen the job end."
    ),
    parameters=[JOB_ID, LAST_EVENT_ID],
    responses={
        200: response(
            "The stream; its schema describes each event",
            sse_events({"state": JOB, "progress": PROGRESS, "error": ERROR}),
            media="text/event-stream",
            headers=("Cache-Control",),
        ),
        **errors(404, 503),
    },
)
def events(job_id: str):
    svc = services()
    job = find_job(svc, job_id)  # a 404 before the stream starts
    stream = event_stream(svc, job, lambda current: job_view(current), request.headers.get("Last-Event-ID"))
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


@bp.get("")
@operation(
    "Your jobs, newest first",
    description="Only the caller's key's jobs; `state` filters, `limit` (1-200, default 50) pages, `cursor` goes on.",
    parameters=_LIST_PARAMETERS,
    responses={200: response("A page of jobs", _PAGE, headers=("Link",)), **errors(422, 503)},
)
def list_jobs():
    """The caller's jobs, newest first: ``?state=QUEUED&limit=50&cursor=...``."""
    svc = services()
    state = _state_filter(request.args.get("state"))
    limit = _limit(request.args.get("limit"))
    before = _cursor(request.args.get("cursor"))
    jobs = svc.store.list_jobs(owner(), state, limit, before)
    cursor = repr(jobs[-1].created_at) if len(jobs) == limit else None
    response = jsonify({"jobs": [job_view(job) for job in jobs], "next_cursor": cursor})
    if cursor is not None:
        next_url = url_for("jobs.list_jobs", cursor=cursor, limit=limit, state=state.value if state else None)
        response.headers["Link"] = f'<{next_url}>; rel="next"'
    return response


def _state_filter(value: str | None) -> JobState | None:
    if value is None:
        return None
    try:
        return JobState(value.upper())
    except ValueError:
        raise ValidationFailed(f"'state' must be one of {', '.join(s.value for s in JobState)}", "state") from None


def _limit(value: str | None) -> int:
    if value is None:
        return DEFAULT_PAGE
    if not value.isdigit() or not 1 <= int(value) <= MAX_PAGE:
        raise ValidationFailed(f"'limit' must be between 1 and {MAX_PAGE}", "limit")
    return int(value)


def _cursor(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        cursor = float(value)
    except ValueError:
        cursor = float("nan")
    if not math.isfinite(cursor):
        raise ValidationFailed("'cursor' must be a next_cursor from an earlier page", "cursor")
    return cursor


def find_job(svc: Services, job_id: str) -> Job:
    job = svc.store.get(job_id) if _JOB_ID.fullmatch(job_id) else None
    if job is None or job.owner != owner():  # another key's job is no business of this one
        raise NotFound(f"no job '{job_id}' (it may have expired)", field="job_id")
    return cancel_if_overdue(svc.store, job)


def job_view(job: Job) -> dict:
    svc = services()
    place = None
    if job.state is JobState.QUEUED:
        queue_place = svc.store.place_in_line(job)
        if queue_place is not None:
            place = PlaceInLine.estimate(queue_place, time.time())
    return render(job, svc.storage, place)
