"""The fleet's one error tree.

::

    FleetError
     ├── RequestError            -> HTTP 4xx, names the offending field
     │    ├── MalformedBody      (400: not a JSON object)
     │    ├── ValidationFailed   (422: wrong type, unknown field, out of bounds)
     │    │    └── ForbiddenDestination  a webhook URL that reaches a loopback, private,
     │    │                              link-local or metadata address
     │    ├── PayloadTooLarge    (413)
     │    ├── UnsupportedMediaType (415)
     │    ├── Unauthorized       (401: no or unknown API key)
     │    ├── NotFound           (404: also another key's job)
     │    ├── TooManyRequests    (429 + Retry-After: rate limit, active-job cap)
     │    └── Conflict           (409: e.g. canceling a job that already finished)
     ├── DependencyUnavailable   -> HTTP 503: broker, job store or storage unreachable
     │    └── ModelUnserved      no live worker serves the model asked for, and
     │                           FLEET_UNSERVED_MODEL=reject (names the field ``model``)
     ├── WaitTimedOut            -> HTTP 504: a request held for its job outlived its bound
     ├── JobError                a job cannot run; it ends FAILED with this reason
     │    ├── PipelineError      the model call raised
     │    ├── ModelOutOfMemory   the model call ran out of device memory (batch is halved)
     │    └── JobCanceled        canceled by its client or its Cancel-After deadline
     └── EngineError             the engine process, not the job
          ├── EngineStartFailed  the model did not load or warm: the worker never consumes
          ├── EngineCrashed      the engine died in a call this job was in (counted, as a
          │                      worker death is, against FLEET_MAX_ATTEMPTS)
          ├── DeviceLost         a device error left the device unusable: the engine exits
          │                      and a new one starts
          └── UnknownMessage     a message outside the engine protocol (workers.protocol):
                                 its batch fails and is retried, never dropped

Every API error renders as ``{"error": {"code", "message", "field"}}``.
"""

from __future__ import annotations

from typing import Any


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    """The one shape of every API error."""
    return {"error": {"code": code, "message": message, "field": field}}


class FleetError(Exception):
    status = 500
    code = "internal"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.field)


class RequestError(FleetError):
    status = 400
    code = "bad_request"


class ValidationFailed(RequestError):
    status = 422
    code = "invalid"


class ForbiddenDestination(ValidationFailed):
    code = "forbidden_destination"

    def __init__(self, message: str, field: str | None = "webhook"):
        super().__init__(message, field)


class MalformedBody(RequestError):
    status = 400
    code = "malformed_json"


class PayloadTooLarge(RequestError):
    status = 413
    code = "too_large"


class UnsupportedMediaType(RequestError):
    status = 415
    code = "unsupported_media_type"


class NotFound(RequestError):
    status = 404
    code = "not_found"


class Unauthorized(RequestError):
    status = 401
    code = "unauthorized"


class TooManyRequests(RequestError):
    """429 with ``Retry-After``: a rate limit or a cap on active jobs."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: float, field: str | None = None):
        super().__init__(message, field)
        self.retry_after_s = retry_after_s


class Conflict(RequestError):
    status = 409
    code = "conflict"


class DependencyUnavailable(FleetError):
    status = 503
    code = "unavailable"

    def __init__(self, dependency: str, detail: str = ""):
        message = f"{dependency} is unavailable" + (f": {detail}" if detail else "")
        super().__init__(message, field=None)
        self.dependency = dependency


class ModelUnserved(DependencyUnavailable):
    """No live worker serves the job's model and the fleet is set to refuse such jobs
    (``FLEET_UNSERVED_MODEL=reject``): nothing was queued, a retry may find one."""

    code = "model_unserved"

    def __init__(self, model: str):
        FleetError.__init__(
            self, f"no live worker serves model '{model}' now: nothing was queued; retry later", field="model"
        )
        self.dependency = f"model {model}"


class WaitTimedOut(FleetError):
    """A request that answers with its job's images (``/v1/images/generations``) held it
    for as long as it may; the job is not lost (``Location`` names it)."""

    status = 504
    code = "timeout"


class JobError(FleetError):
    code = "job_failed"


class PipelineError(JobError):
    code = "pipeline_failed"


class ModelOutOfMemory(JobError):
    code = "out_of_memory"


class JobCanceled(JobError):
    """Canceled by its client, or not started before its ``Cancel-After`` deadline."""

    code = "canceled"


class EngineError(FleetError):
    code = "engine"


class EngineStartFailed(EngineError):
    code = "engine_start_failed"


class EngineCrashed(EngineError):
    code = "engine_crashed"


class DeviceLost(EngineError):
    code = "device_lost"


class UnknownMessage(EngineError):
    """A message that is not part of the engine protocol reached the worker or the engine:
    the two ends run different code. ``batch_id`` is the batch it names, when it names one."""

    code = "engine_protocol"

    def __init__(self, message: str, batch_id: int | None = None):
        super().__init__(message)
        self.batch_id = batch_id
