"""``GET /openapi.json``: the API described as OpenAPI 3.1, assembled from the routes.

Each view declares its own operation beside its route with ``@operation(...)``: adding a
route is its decorator, and a route without one fails ``tests/app/test_openapi.py``. This
module holds what operations share (the error envelope, the headers, the job id) and
builds the document from the app's URL map. Schemas come from the models the code uses:
the request body from ``tasks.request.request_model`` (the model ``POST /v1/jobs``
validates with, bounds included), jobs from ``tasks.views.JobView`` (the model responses
are rendered from); header patterns are the ones their parsers match with.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from flask import Blueprint, Flask, current_app, jsonify
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode

from app.services import services
from app.waiting import MAX_WAIT_S, PREFER_PATTERN
from tasks.cancel import CANCEL_AFTER_PATTERN, MAX_CANCEL_AFTER_S, MIN_CANCEL_AFTER_S
from tasks.catalog import ModelList
from tasks.request import RequestBounds, request_model
from tasks.settings import Settings
from tasks.views import JobView

bp = Blueprint("openapi", __name__)

View = TypeVar("View", bound=Callable[..., Any])
Schema = dict[str, Any]


def operation(
    summary: str,
    *,
    responses: Mapping[int, Schema],
    description: str = "",
    parameters: Sequence[Schema] = (),
    body: Schema | None = None,
    tag: str = "jobs",
    keyed: bool | None = None,
) -> Callable[[View], View]:
    """Document the view it decorates (put it under the route decorator). ``keyed``: it
    takes an API key (every ``/v1`` route: the default for the ``jobs`` and ``images``
    tags), so it may also answer 401 and 429."""
    keyed = tag in ("jobs", "images", "webhooks") if keyed is None else keyed
    if keyed:
        responses = {**errors(401, 429), **responses}
    doc: Schema = {"summary": summary, "tags": [tag], "responses": {str(s): r for s, r in sorted(responses.items())}}
    if keyed:
        doc["security"] = [{"apiKey": []}]
    if description:
        doc["description"] = description
    if parameters:
        doc["parameters"] = list(parameters)
    if body is not None:
        doc["requestBody"] = body

    def mark(view: View) -> View:
        view.openapi = doc  # type: ignore[attr-defined]
        return view

    return mark


def ref(kind: str, name: str) -> Schema:
    return {"$ref": f"#/components/{kind}/{name}"}


JOB = ref("schemas", "Job")
ERROR = ref("schemas", "Error")
PROGRESS = ref("schemas", "Progress")

#: Request bodies whose bounds are configured, by component name: ``document`` builds each
#: for the settings it describes (``POST /v1/jobs``'s ``JobRequest`` is built in place; a
#: route module adds its own here at import, as ``app.openai_images`` does).
BOUNDED_SCHEMAS: dict[str, Callable[[RequestBounds], Schema]] = {}


def sse_events(events: Mapping[str, Schema]) -> Schema:
    """The schema of one Server-Sent Event of a stream whose events are named by ``events``
    and carry the JSON ``events[name]`` describes in their ``data``.

    Under OpenAPI 3.1 a ``text/event-stream`` schema describes each event (3.2 names the
    same thing ``itemSchema``): an object of the event's fields, ``event``, ``data``, ``id``
    and ``retry``, as schemathesis and 3.2 tools parse them; ``data`` is a string holding
    JSON, so it is described by ``contentMediaType`` and ``contentSchema``."""
    return {
        "oneOf": [
            {
                "type": "object",
                "required": ["event", "data"],
                "properties": {
                    "event": {"const": name},
                    "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data},
                    "id": {"type": "string"},
                    "retry": {"type": "integer"},
                },
            }
            for name, data in events.items()
        ]
    }


def json_body(schema: str, example: Schema) -> Schema:
    """A required JSON body; the example is what /docs pre-fills (valid, and tested so)."""
    media = {"schema": ref("schemas", schema), "example": example}
    return {"required": True, "content": {"application/json": media}}


def response(
    description: str, schema: Schema | None = None, *, media: str = "application/json", headers: Sequence[str] = ()
) -> Schema:
    """A response; ``headers`` names its headers among the components'."""
    answer: Schema = {"description": description}
    if schema is not None:
        answer["content"] = {media: {"schema": schema}}
    if headers:
        answer["headers"] = {name: ref("headers", name) for name in headers}
    return answer


#: What each error status means wherever it is answered; ``errors(...)`` picks them.
ERRORS = {
    400: "The body is not JSON (`malformed_json`).",
    404: "No such job, or it expired (`not_found`, field `job_id`).",
    409: "The job already ended otherwise (`conflict`).",
    413: "The body is over FLEET_MAX_BODY_BYTES (`too_large`).",
    415: "The body is not `application/json` (`unsupported_media_type`).",
    401: "No API key, or an unknown one (`unauthorized`, field `Authorization`).",
    422: "A field or header is invalid; `error.field` names it (`invalid`, `forbidden_destination`).",
    429: "Over the key's rate limit or its cap on active jobs (`rate_limited`); try again after Retry-After.",
    500: "The job failed (`job_failed`, ...).",
    503: "The broker, job store or storage is unreachable (`unavailable`); try again after Retry-After.",
    504: "The job did not end within the route's hold (`timeout`); it goes on at Location.",
}


#: What a 422 also means where a submission takes an ``Idempotency-Key``.
REUSED_KEY = (
    " Also an `Idempotency-Key` used before with another request (field `Idempotency-Key`): a new job needs a new key."
)


def errors(*statuses: int, idempotent: bool = False) -> dict[int, Schema]:
    """The error responses of ``statuses``; ``idempotent``: the route takes an ``Idempotency-Key``."""
    described = {s: ERRORS[s] + (REUSED_KEY if idempotent and s == 422 else "") for s in statuses}
    return {s: response(d, ERROR, headers=("Retry-After",) if s in (429, 503) else ()) for s, d in described.items()}


JOB_ID = ref("parameters", "job_id")
PREFER = ref("parameters", "Prefer")
CANCEL_AFTER = ref("parameters", "Cancel-After")
IDEMPOTENCY_KEY = ref("parameters", "Idempotency-Key")
LAST_EVENT_ID = ref("parameters", "Last-Event-ID")

_PARAMETERS: Schema = {
    "job_id": {
        "name": "job_id",
        "in": "path",
        "required": True,
        "description": "The job's id, as the 202 that accepted it gave it (32 hex digits).",
        "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
    },
    "Prefer": {
        "name": "Prefer",
        "in": "header",
        "description": (
            f"RFC 7240 preferences. `wait=N` holds the request until the job ends (then 200) or N seconds pass, "
            f"at most {MAX_WAIT_S} (a bare `wait` asks for {MAX_WAIT_S}); `Preference-Applied` says what was "
            "applied. Other preferences are ignored; a `wait` that is not a number of seconds is a 422."
        ),
        "schema": {"type": "string", "pattern": PREFER_PATTERN},
    },
    "Cancel-After": {
        "name": "Cancel-After",
        "in": "header",
        "description": (
            "Cancel the job if no model call has started it this long after it was accepted: seconds (`90`) "
            "or a duration (`90s`, `1m30s`, `500ms`, `2h`). Under "
            f"{MIN_CANCEL_AFTER_S:g} s counts as {MIN_CANCEL_AFTER_S:g} s, over {MAX_CANCEL_AFTER_S:g} s as "
            f"{MAX_CANCEL_AFTER_S:g} s; the job's `cancel_at` shows the deadline applied."
        ),
        "schema": {"type": "string", "pattern": CANCEL_AFTER_PATTERN},
    },
}

_PARAMETERS["Idempotency-Key"] = {
    "name": "Idempotency-Key",
    "in": "header",
    "description": (
        "Makes a retried submission safe: the same key and body return the job they made before (with "
        "`Idempotent-Replayed: true`); the same key with another body is a 422. Remembered per API key for "
        "FLEET_IDEMPOTENCY_TTL_S."
    ),
    "schema": {"type": "string", "pattern": "^[\\x20-\\x7e]{1,255}$"},
}

_PARAMETERS["Last-Event-ID"] = {
    "name": "Last-Event-ID",
    "in": "header",
    "description": (
        "The `id` of the last event a client got before its connection dropped (EventSource sends it when it "
        "reconnects): the stream starts with the job's current state, or ends at once if that id says the "
        "client saw the job end. Any other value is a fresh start."
    ),
    "schema": {"type": "string"},
}

_HEADERS: Schema = {
    "Location": {
        "description": "Where the job can be read: `/v1/jobs/{job_id}`.",
        "required": True,
        "schema": {"type": "string", "pattern": "^/v1/jobs/[0-9a-f]{32}$"},
    },
    "Preference-Applied": {
        "description": "The wait applied, in seconds (capped), when the request asked for one.",
        "schema": {"type": "string", "pattern": "^wait=[0-9]+(\\.[0-9]+)?$"},
    },
    "Retry-After": {"description": "Seconds to wait before trying again.", "schema": {"type": "integer"}},
    "Cache-Control": {"description": "Proxies must not cache the stream.", "schema": {"const": "no-cache"}},
    "Idempotent-Replayed": {
        "description": "`true` when an Idempotency-Key returned the job it made before.",
        "schema": {"const": "true"},
    },
    "Link": {"description": 'The next page: `<url>; rel="next"`.', "schema": {"type": "string"}},
}

_ERROR: Schema = {
    "type": "object",
    "description": "Every error the API answers, whatever its status.",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "field"],
            "properties": {
                "code": {"type": "string", "description": "Stable, for programs: `invalid`, `not_found`, ..."},
                "message": {"type": "string", "description": "For people."},
                "field": {
                    "type": ["string", "null"],
                    "description": "The body field, header or path parameter at fault; null when none is.",
                },
            },
        }
    },
}


_PROGRESS: Schema = {
    "type": "object",
    "description": "A `progress` event: the model call job `id` is in finished denoising step `step` of `total`.",
    "required": ["id", "step", "total"],
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
        "step": {"type": "integer", "minimum": 0},
        "total": {"type": "integer", "minimum": 1},
    },
}


def document(app: Flask, settings: Settings) -> Schema:
    """The document: every documented rule of ``app``, its components for ``settings``."""
    paths: dict[str, Schema] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda rule: rule.rule):
        doc = getattr(app.view_functions[rule.endpoint], "openapi", None)
        if doc is not None:
            for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
                paths.setdefault(openapi_path(rule.rule), {})[method.lower()] = doc
    request = request_model(RequestBounds.of(settings))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "diffusion-fleet",
            "version": "1",
            "description": "Text-to-image jobs, batched on GPU workers. Interactive docs: `/docs`.",
        },
        "paths": paths,
        "components": {
            "schemas": {
                **_schemas(request, "validation"),
                **{name: build(RequestBounds.of(settings)) for name, build in BOUNDED_SCHEMAS.items()},
                **_schemas(JobView, "serialization", name="Job"),
                **_schemas(ModelList, "serialization"),
                "Error": _ERROR,
                "Progress": _PROGRESS,
            },
            "parameters": _PARAMETERS,
            "headers": _HEADERS,
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`Authorization: Bearer <key>`; the local development key is `fleet-dev-key`.",
                }
            },
        },
    }


def openapi_path(rule: str) -> str:
    """A Flask rule as an OpenAPI path: ``/v1/jobs/<job_id>`` -> ``/v1/jobs/{job_id}``."""
    return re.sub(r"<(?:[^<>:]+:)?([^<>]+)>", r"{\1}", rule)


def _schemas(model: type[BaseModel], mode: JsonSchemaMode, name: str | None = None) -> Schema:
    """A model's JSON schema and the models it uses, as components of their own."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
    nested = schema.pop("$defs", {})
    return {**nested, name or schema["title"]: schema}


@bp.get("/openapi.json")
@operation(
    "This document",
    tag="meta",
    responses={200: response("OpenAPI 3.1, generated from the models the API validates with", {"type": "object"})},
)
def openapi_json():
    return jsonify(document(current_app, services().settings))
