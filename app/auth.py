"""Who is asking, and whether they may: every ``/v1`` route takes
``Authorization: Bearer <key>`` (``tasks.keys``); a submission is counted against the
key's rate limit and its cap on active jobs, both kept in Redis so they hold across the
API's processes and replicas."""

from __future__ import annotations

from flask import Blueprint, g, request

from app.services import Services, services
from tasks.errors import TooManyRequests, Unauthorized


def require_key(bp: Blueprint) -> None:
    """Every route of ``bp`` answers 401 without a known key."""
    bp.before_request(_authenticate)


def _authenticate() -> None:
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise Unauthorized("send your API key as 'Authorization: Bearer <key>'", field="Authorization")
    owner = services().keys.owner(presented.strip())
    if owner is None:
        raise Unauthorized("unknown API key", field="Authorization")
    g.owner = owner


def owner() -> str:
    """The name of the key the current request came with."""
    return g.owner


def admit_submission(svc: Services, name: str) -> None:
    """Count a submission of ``name``: 429 with ``Retry-After`` past its rate limit or its
    cap on jobs not yet finished."""
    settings = svc.settings
    if settings.rate_limit_per_minute:
        count, window_left_s = svc.owners.count_request(name)
        if count > settings.rate_limit_per_minute:
            raise TooManyRequests(
                f"over {settings.rate_limit_per_minute} submissions a minute for this key", window_left_s
            )
    if settings.max_active_jobs_per_key and svc.owners.active_jobs(name) >= settings.max_active_jobs_per_key:
        raise TooManyRequests(
            f"this key has {settings.max_active_jobs_per_key} jobs queued or running: wait for some to finish", 5.0
        )
