"""``POST /v1/jobs`` accepts a job; ``GET /v1/jobs/<id>`` reports it, with download URLs."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone

from flask import Blueprint, jsonify, request, url_for

from app.services import services
from tasks.errors import MalformedBody, NotFound, UnsupportedMediaType
from tasks.jobs import Job, JobState, new_job_id, parse_request
from tasks.store import now
from tasks.submit import submit_job
from tasks.views import ImageLink, JobView

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


@bp.post("")
def submit():
    svc = services()
    if request.mimetype and request.mimetype != "application/json":
        raise UnsupportedMediaType("send the job as application/json", field=None)
    try:
        body = json.loads(request.get_data(cache=False) or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedBody(f"the body is not valid JSON: {exc}") from None
    spec = parse_request(body, svc.settings)

    job = Job(id=new_job_id(), state=JobState.QUEUED, spec=spec, created_at=now(), queue=svc.settings.queue)
    submit_job(svc.store, svc.celery, svc.settings, job)
    response = jsonify(job_view(job))
    response.status_code = 202
    response.headers["Location"] = url_for("jobs.status", job_id=job.id)
    return response


@bp.get("/<job_id>")
def status(job_id: str):
    job = services().store.get(job_id) if _JOB_ID.match(job_id) else None
    if job is None:
        raise NotFound(f"no job '{job_id}' (it may have expired)", field="job_id")
    return jsonify(job_view(job))


def job_view(job: Job) -> dict:
    images = []
    if job.state is JobState.SUCCEEDED:
        storage = services().storage
        for key in job.image_keys:
            signed = storage.presign(key)
            expires_at = datetime.fromtimestamp(now() + signed.expires_in_s, timezone.utc)
            images.append(ImageLink(url=signed.url, expires_in_s=signed.expires_in_s, expires_at=expires_at))
    return JobView.of(job, images).model_dump(mode="json")
