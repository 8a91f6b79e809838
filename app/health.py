"""Probes: ``/healthz`` says the process is alive; ``/readyz`` that its dependencies answer."""

from __future__ import annotations

from flask import Blueprint, jsonify

from app.openapi import ERROR, operation, response
from app.services import services
from tasks.celery import ping_broker
from tasks.errors import DependencyUnavailable, error_body

bp = Blueprint("health", __name__)

_CHECKS = {
    "type": "object",
    "description": "Each dependency: `ok`, or why it is unavailable.",
    "properties": {name: {"type": "string"} for name in ("broker", "job_store", "storage")},
    "required": ["broker", "job_store", "storage"],
}


@bp.get("/healthz")
@operation(
    "Liveness: the process answers",
    tag="probes",
    responses={200: response("Alive", {"type": "object", "properties": {"status": {"const": "ok"}}})},
)
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
@operation(
    "Readiness: the broker, the job store and the storage answer",
    tag="probes",
    responses={
        200: response(
            "Ready",
            {"type": "object", "properties": {"status": {"const": "ready"}, "checks": _CHECKS}, "required": ["checks"]},
        ),
        503: response(
            "A dependency is unavailable",
            {"allOf": [ERROR, {"properties": {"checks": _CHECKS}, "required": ["checks"]}]},
            headers=("Retry-After",),
        ),
    },
)
def readyz():
    svc = services()
    checks = {
        "broker": lambda: ping_broker(svc.celery, svc.settings.publish_timeout_s),
        "job_store": svc.store.ping,
        "storage": svc.storage.ping,
    }
    results: dict[str, str] = {}
    failing: list[str] = []
    for name, check in checks.items():
        try:
            check()
            results[name] = "ok"
        except DependencyUnavailable as exc:
            results[name] = exc.message
            failing.append(name)
    if failing:
        body = error_body("unavailable", f"not ready: {', '.join(failing)} unavailable") | {"checks": results}
        response = jsonify(body)
        response.status_code = 503
        response.headers["Retry-After"] = "5"
        return response
    return jsonify({"status": "ready", "checks": results})
