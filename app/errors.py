"""Every error leaves the API as ``{"error": {"code", "message", "field"}}`` with a 4xx/5xx status."""

from __future__ import annotations

import logging
import math

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge

from tasks.errors import DependencyUnavailable, FleetError, PayloadTooLarge, TooManyRequests, Unauthorized, error_body

log = logging.getLogger(__name__)


def error_response(exc: FleetError):
    response = jsonify(exc.to_dict())
    response.status_code = exc.status
    if isinstance(exc, DependencyUnavailable):
        response.headers["Retry-After"] = "5"
    elif isinstance(exc, TooManyRequests):
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    elif isinstance(exc, Unauthorized):
        response.headers["WWW-Authenticate"] = 'Bearer realm="diffusion-fleet"'
    return response


def register(app: Flask) -> None:
    @app.errorhandler(FleetError)
    def _fleet_error(exc: FleetError):
        if exc.status >= 500:
            log.warning("%s: %s", exc.code, exc.message)
        return error_response(exc)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc: RequestEntityTooLarge):
        limit = app.config.get("MAX_CONTENT_LENGTH")
        return error_response(PayloadTooLarge(f"the request body is over {limit} bytes", field=None))

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        response = jsonify(error_body(code, exc.description or ""))
        response.status_code = exc.code or 500
        allowed = exc.valid_methods if isinstance(exc, MethodNotAllowed) else None
        if allowed:
            response.headers["Allow"] = ", ".join(allowed)
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(FleetError("internal server error"))
