"""``POST /v1/images/generations``: OpenAI's image API in front of the fleet's own jobs.

An OpenAI client (``OpenAI(base_url=".../v1", api_key=<fleet key>)``) gets its images in
the response, as it expects. Underneath, each request is an ordinary job: the same
admission (key, rate limit, cap on active jobs, ``Idempotency-Key``), the same queue and
the same batcher as ``POST /v1/jobs``, listed under ``GET /v1/jobs``. The request is held
on the job-event subscription until the job ends, for at most ``FLEET_OPENAI_TIMEOUT_S``
(under gevent a held request is a greenlet, not a thread). docs/OPENAI.md has the field
mapping, what is refused and why, and what a client sees when the bound runs out.
"""

from __future__ import annotations

import base64
import re
from typing import Literal

from flask import Blueprint, Response, current_app, jsonify, request, url_for
from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, StrictStr

from app.auth import require_key
from app.errors import error_response
from app.jobs import accept, parse_json_body, request_fingerprint, wait_for
from app.openapi import BOUNDED_SCHEMAS, IDEMPOTENCY_KEY, Schema, errors, operation, ref, response
from app.services import Services, services
from tasks.cancel import NOT_STARTED_IN_TIME
from tasks.errors import Conflict, FleetError, JobError, ValidationFailed, WaitTimedOut
from tasks.jobs import Job, JobState
from tasks.request import RequestBounds, WholeInt, model_rules, request_model, validate_body, validate_request

bp = Blueprint("openai_images", __name__, url_prefix="/v1/images")
require_key(bp)

_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")  # ASCII digits only: int() reads others too
#: The job fields whose bounds this route's clients know by OpenAI's names: a refusal
#: names the field they sent (``param``) and says it in their words.
_OPENAI_NAMES = {
    "num_images": ("n", "'n'"),
    "steps": ("num_inference_steps", "'num_inference_steps'"),
    "width": ("size", "'size': width"),
    "height": ("size", "'size': height"),
}


class ImageGenerationRequest(BaseModel):
    """The body of ``POST /v1/images/generations``: OpenAI's fields that the fleet can
    honour, and its own extras (the openai client sends them with ``extra_body=``).

    Everything else (``style``, ``background``, ``moderation``, ``output_compression``,
    ``quality`` other than the default, ...) is refused by name: answering as if it were
    honoured would hand back images that are not what was asked for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: StrictStr
    n: WholeInt = 1  # integers as JSON has them (1.0 is 1), like every job field
    size: StrictStr = "auto"  # "WIDTHxHEIGHT"; auto: the fleet's default size
    response_format: Literal["url", "b64_json"] | None = None  # None: url
    output_format: Literal["png", "webp", "jpeg"] | None = None  # None: png
    # Asking for the default quality is honoured (code written for DALL-E 3 commonly does).
    quality: Literal["auto", "standard"] | None = None
    stream: Literal[False] | None = None
    model: StrictStr | None = None  # a name from GET /v1/models; None: the default model
    # Accepted and unused: the fleet accounts by key, not by end user.
    user: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    # The fleet's extras.
    seed: WholeInt | None = None
    num_inference_steps: WholeInt | None = None
    guidance_scale: StrictFloat | StrictInt | None = None
    negative_prompt: StrictStr | None = None

    def to_job_body(self) -> dict:
        """The same request as a ``POST /v1/jobs`` body: validated by the same model."""
        width, height = _size(self.size)
        body = {
            "prompt": self.prompt,
            "model": self.model,
            "negative_prompt": self.negative_prompt,
            "width": width,
            "height": height,
            "steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "seed": self.seed,
            "num_images": self.n,
            "output_format": self.output_format,
        }
        return {name: value for name, value in body.items() if value is not None}


#: This route's fields -> the job fields they become: the document shows the job's bounds on them.
_AS_JOB_FIELDS = {
    "prompt": "prompt",
    "model": "model",
    "negative_prompt": "negative_prompt",
    "n": "num_images",
    "num_inference_steps": "steps",
    "guidance_scale": "guidance_scale",
    "seed": "seed",
}


def generation_schema(bounds: RequestBounds) -> Schema:
    """The request's JSON Schema with the bounds it is held to: each field that becomes a
    job field has that field's schema (``request_model``'s, which ``validate_request``
    checks the job with) and ``size`` a pattern of exactly the sizes the bounds allow."""
    schema = ImageGenerationRequest.model_json_schema()
    job = request_model(bounds).model_json_schema()["properties"]
    for name, field in _AS_JOB_FIELDS.items():
        ours = schema["properties"][name]
        schema["properties"][name] = {**job[field], **{k: v for k, v in ours.items() if k in ("title", "default")}}
    # A model's own step range, on this route's name for steps (its schedulers: not a field here).
    rules = [
        {"if": rule["if"], "then": {"properties": {"num_inference_steps": rule["then"]["properties"]["steps"]}}}
        for rule in model_rules(bounds)
        if "steps" in rule["then"]["properties"]
    ]
    if rules:
        schema["allOf"] = rules
    schema["properties"]["size"] = {
        "type": "string",
        "pattern": size_pattern(bounds),
        "default": "auto",
        "description": (
            f"WIDTHxHEIGHT, each a multiple of 8 from 8 to {bounds.largest_side} and together at most "
            f"{bounds.max_pixels} pixels; auto: {bounds.default_width}x{bounds.default_height}."
        ),
    }
    return schema


def size_pattern(bounds: RequestBounds) -> str:
    """Every ``size`` the bounds allow, as a pattern: per run of widths that share a tallest
    height, those widths by those heights (one run where the budget fits every pair)."""
    runs: dict[int, list[int]] = {}
    for width in range(8, bounds.largest_side + 1, 8):
        runs.setdefault(bounds.tallest(width), []).append(width)
    sizes = [f"(?:{_numbers(widths)})x(?:{_numbers(range(8, tallest + 1, 8))})" for tallest, widths in runs.items()]
    return f"^(?:auto|{'|'.join(sizes)})$"


def _numbers(values) -> str:
    """Alternatives matching each value as ``_SIZE`` reads it: up to 5 digits, zeros first."""
    return "|".join(f"0{{0,{5 - len(str(v))}}}{v}" for v in values)


BOUNDED_SCHEMAS["ImageGenerationRequest"] = generation_schema

_GENERATED = {
    "type": "object",
    "required": ["created", "data"],
    "properties": {
        "created": {"type": "integer"},
        "data": {
            "type": "array",
            "items": {"type": "object", "properties": {"url": {"type": "string"}, "b64_json": {"type": "string"}}},
        },
    },
}


@bp.post("/generations")
@operation(
    "OpenAI-compatible image generation, answered when its job ends",
    tag="images",
    description="An ordinary job (same queue and batching as `POST /v1/jobs`), held up to FLEET_OPENAI_TIMEOUT_S.",
    parameters=[IDEMPOTENCY_KEY],
    body={"required": True, "content": {"application/json": {"schema": ref("schemas", "ImageGenerationRequest")}}},
    responses={
        200: response("The images", _GENERATED, headers=("Idempotent-Replayed",)),
        **errors(400, 409, 413, 415, 422, 500, 503, 504, idempotent=True),
    },
)
def generate():
    svc = services()
    body = parse_json_body()
    generation = validate_body(body, ImageGenerationRequest)
    timeout_s = svc.settings.openai_timeout_s
    try:
        # Its Cancel-After is the hold: a job no worker started by then is dropped, not
        # left to run for a client that has been told it failed.
        job_request = validate_request(generation.to_job_body(), svc.settings)
        job, replayed = accept(svc, job_request, timeout_s, fingerprint=request_fingerprint(body, request.path))
    except ValidationFailed as exc:
        raise _in_openai_terms(exc) from None
    job = wait_for(svc, job, timeout_s)
    if job.state is JobState.SUCCEEDED:
        images = [_image(svc, key, generation.response_format or "url") for key in job.image_keys]
        response = jsonify({"created": int(job.created_at), "data": images})
    else:
        response = _without_images(job, timeout_s)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


@bp.after_request
def _openai_error_keys(response: Response) -> Response:
    """Error bodies keep the fleet's ``{"error": {"code", "message", "field"}}`` and add
    the two keys of OpenAI's errors that it lacks: ``param`` (the field; the openai client's
    ``APIError.param``) and ``type`` (``invalid_request_error`` or ``server_error``, as
    OpenAI's API says). Here, not in ``app.errors``, so that other routes keep one shape;
    and after the request, so that the 401 of ``require_key`` gets them too."""
    if response.status_code < 400 or not response.is_json:
        return response
    body = response.get_json()
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        error["param"] = error.get("field")
        error["type"] = "server_error" if response.status_code >= 500 else "invalid_request_error"
        response.set_data(current_app.json.dumps(body))
    return response


def _size(size: str) -> tuple[int | None, int | None]:
    if size == "auto":
        return None, None
    match = _SIZE.fullmatch(size)
    if not match:
        raise ValidationFailed(f"'size' must be WIDTHxHEIGHT (e.g. 512x512) or auto, got '{size}'", field="size")
    return int(match[1]), int(match[2])


def _in_openai_terms(exc: ValidationFailed) -> ValidationFailed:
    if exc.field not in _OPENAI_NAMES:
        return exc
    name, words = _OPENAI_NAMES[exc.field]
    quoted = f"'{exc.field}'"
    message = exc.message.replace(quoted, words) if quoted in exc.message else f"'{name}': {exc.message}"
    return ValidationFailed(message, field=name)


def _image(svc: Services, key: str, response_format: str) -> dict[str, str]:
    if response_format == "b64_json":
        return {"b64_json": base64.b64encode(svc.storage.get(key)).decode("ascii")}
    return {"url": svc.storage.presign(key).url}


def _without_images(job: Job, timeout_s: float) -> Response:
    """Why a held request ends without images, with ``Location`` naming its job.

    ``x-should-retry: false`` tells the openai client (and every client generated like it)
    not to retry: each retry would be a new job, and the fleet already retried what it
    could. A 202 would be worse: the client would read it as an answer with no images."""
    exc: FleetError
    if job.state is JobState.FAILED:
        exc = JobError(f"job {job.id} failed: {job.error}")
    elif job.state is JobState.CANCELED and job.error != NOT_STARTED_IN_TIME:
        exc = Conflict(f"job {job.id} ended CANCELED: {job.error}")
    elif job.state is JobState.CANCELED:
        exc = WaitTimedOut(f"no worker started job {job.id} within {timeout_s:g} s, so it was canceled: try later")
    else:
        exc = WaitTimedOut(
            f"job {job.id} did not finish within {timeout_s:g} s; it goes on, and GET /v1/jobs/{job.id} "
            "shows its images once it does"
        )
    response = error_response(exc)
    response.headers["Location"] = url_for("jobs.status", job_id=job.id)
    response.headers["x-should-retry"] = "false"
    return response
