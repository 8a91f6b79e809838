"""Schemathesis hooks for the run against the idle API (``test_openapi``): they keep each
request's meaning and bound how long the API may hold it on a queue no worker consumes.

Loaded by ``st run`` through ``SCHEMATHESIS_HOOKS=tests.app.schemathesis_hooks``.
"""

from __future__ import annotations

import hashlib
import json

import schemathesis
from schemathesis.core import NotSet

from app.jobs import IDEMPOTENCY_KEY_PATTERN
from app.waiting import parse_prefer_wait
from tasks.cancel import parse_duration
from tasks.errors import ValidationFailed

#: The jobs a run makes are canceled this soon by their own ``Cancel-After`` (the stream and
#: ``Prefer: wait`` cancel an overdue job), so no event stream of theirs stays open.
CANCEL_AFTER = "1s"


def bound(headers: dict[str, str], body: object, submits: bool) -> dict[str, str]:
    """``headers`` with a valid ``Prefer: wait`` cut to 0.1 s (``test_waiting`` covers long
    ones), a submission's valid or absent ``Cancel-After`` set to 1 s, and a valid
    ``Idempotency-Key`` made unique to the request it came with: the generator reuses keys
    with other bodies, which is rightly a 422 (``test_keys`` covers reuse). Malformed
    values stay as they are: they must be refused."""
    headers = dict(headers)
    try:
        if (parse_prefer_wait(headers.get("Prefer")) or 0) > 0.1:
            headers["Prefer"] = "wait=0.1"
    except ValidationFailed:
        pass
    if submits:
        try:
            if "Cancel-After" in headers:
                parse_duration(headers["Cancel-After"])
            headers["Cancel-After"] = CANCEL_AFTER
        except ValidationFailed:
            pass
    key = headers.get("Idempotency-Key")
    if key is not None and IDEMPOTENCY_KEY_PATTERN.fullmatch(key):
        request = json.dumps([body, headers.get("Cancel-After")], sort_keys=True, default=repr)
        headers["Idempotency-Key"] = f"{key[:200]}-{hashlib.sha256(request.encode()).hexdigest()[:16]}"
    return headers


@schemathesis.hook
def before_call(context, case, kwargs) -> None:
    body = None if isinstance(case.body, NotSet) else case.body
    submits = case.method.upper() == "POST" and case.path == "/v1/jobs"
    case.headers = bound(case.headers or {}, body, submits)
