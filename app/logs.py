"""The API's logs: each request's lines carry its job id, and gunicorn's access line too.

A request about a job (``/v1/jobs/<id>...``) knows its id from the URL; a submission
learns it once the job is made (``note_job``). Either way the id goes into the request's
log context (every line the app logs meanwhile carries it, ``tasks.logs``) and into the
WSGI environ, where gunicorn's access logger (``fleet.web.JsonLogger``, with
``FLEET_LOG_FORMAT=json``) finds it after the response: the access line of ``POST
/v1/jobs`` names the job it made, which the worker's lines name too.
"""

from __future__ import annotations

from flask import Flask, g, request

from tasks.logs import JOB_ID_ENVIRON, bind_log_context, close_log_context, open_log_context


def register(app: Flask) -> None:
    app.before_request(_enter)
    app.teardown_request(_leave)


def note_job(job_id: str) -> None:
    """This request is about ``job_id`` (a submission that just made it)."""
    request.environ[JOB_ID_ENVIRON] = job_id
    bind_log_context(job_id=job_id)


def _enter() -> None:
    # Its own context per request (gevent gives each greenlet one, threads have theirs).
    job_id = (request.view_args or {}).get("job_id")
    if job_id:
        request.environ[JOB_ID_ENVIRON] = job_id
    g.fleet_log_token = open_log_context(**({"job_id": job_id} if job_id else {}))


def _leave(_exc: BaseException | None) -> None:
    token = g.pop("fleet_log_token", None)
    if token is not None:
        close_log_context(token)
