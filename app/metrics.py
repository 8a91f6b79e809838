"""What autoscalers and Prometheus read from the API: the fleet's true backlog per queue.

``GET /metrics`` (Prometheus text) and ``GET /metrics/backlog`` (JSON, for KEDA's
metrics-api scaler) count, per job queue, the jobs QUEUED and the jobs RUNNING (taken by
a worker: in its batcher or its model call) from the job store. The broker's queue length
misses the second kind: Redis hands prefetched messages out of its list, and RabbitMQ's
ready count leaves out unacknowledged ones, so scaling on it alone under-counts and can
take away a worker in the middle of its batch. Both routes are unauthenticated, for the
cluster's scrapers: expose them inside the cluster only (docs/KUBERNETES.md).

Beside the backlog, ``/metrics`` counts what the API itself did: requests by route, method
and status, their latency, and job submissions accepted (by queue) and refused (by error
code). Under gunicorn each worker process counts its own requests; ``fleet web`` gives them
a shared ``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` adds up every process's files, so a
scrape answered by any process reports the whole API (``app.gunicorn_config`` marks a dead
worker's files). Without that directory (tests, ``flask run``) the process counts alone.
"""

from __future__ import annotations

import os
import time

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from app.openapi import errors, operation, response
from app.services import Services, services

bp = Blueprint("metrics", __name__)
_COUNTS = {
    "type": "object",
    "required": ["queued", "running", "backlog"],
    "properties": {name: {"type": "integer", "minimum": 0} for name in ("queued", "running", "backlog")},
}
_BACKLOG = {
    "type": "object",
    "required": ["queues", "models", "backlog"],
    "properties": {
        "queues": {"type": "object", "additionalProperties": _COUNTS},
        # Per model of the registry, over its queues: what a model pool's scaler reads.
        "models": {"type": "object", "additionalProperties": _COUNTS},
        "backlog": {"type": "integer", "minimum": 0},
    },
}

#: Where gunicorn's worker processes write their metrics (prometheus_client's variable).
MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

#: The routes that submit a job: their 4xx and 5xx answers are refused submissions.
SUBMIT_ENDPOINTS = frozenset({"jobs.submit", "openai_images.generate"})

#: Waiting requests (``Prefer: wait``, the images route) are held for up to minutes.
_REQUEST_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ApiMetrics:
    """What this API process did. In multiprocess mode the values live in the shared
    directory's files, and ``registry`` (this process alone) is never served."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        self.requests = Counter(
            "fleet_api_requests_total",
            "HTTP requests answered, by route (the URL rule, not the URL), method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "fleet_api_request_seconds",
            "Time to answer a request, by route and method (held requests included; a stream to its headers)",
            ["route", "method"],
            buckets=_REQUEST_SECONDS,
            registry=r,
        )
        self.in_progress = Gauge(
            "fleet_api_requests_in_progress",
            "Requests being answered now (held ones included), over every API process",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.accepted = Counter(
            "fleet_api_jobs_accepted_total", "Jobs accepted (a replayed Idempotency-Key not counted), by queue",
            ["queue"], registry=r,
        )  # fmt: skip
        self.rejected = Counter(
            "fleet_api_jobs_rejected_total",
            "Job submissions refused, by error code (invalid, rate_limited, unavailable, ...)",
            ["reason"],
            registry=r,
        )


class BacklogCollector:
    """Reads the backlog from the job store at each scrape (nothing cached, nothing to
    keep right across gunicorn's processes)."""

    def __init__(self, svc: Services):
        self._svc = svc

    def collect(self):
        backlog = self._svc.store.backlog(self._svc.registry.job_queues)
        jobs = GaugeMetricFamily(
            "fleet_backlog_jobs", "Jobs not finished, by queue and state", labels=["queue", "state"]
        )
        total = GaugeMetricFamily(
            "fleet_backlog", "Jobs queued or running, by queue: what to scale on", labels=["queue"]
        )
        for queue, (queued, running) in backlog.items():
            jobs.add_metric([queue, "queued"], queued)
            jobs.add_metric([queue, "running"], running)
            total.add_metric([queue], queued + running)
        yield jobs
        yield total


def register(app: Flask, svc: Services) -> None:
    """Count ``app``'s requests and serve them with the backlog of ``svc``."""
    metrics = ApiMetrics()
    multiproc_dir = os.environ.get(MULTIPROC_DIR_VARIABLE)
    if multiproc_dir:
        registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(registry, path=multiproc_dir)
    else:
        registry = metrics.registry
    registry.register(BacklogCollector(svc))
    app.extensions["fleet_metrics"] = registry
    app.extensions["fleet_api_metrics"] = metrics
    app.before_request(_started)
    app.after_request(_answered)
    app.teardown_request(_ended)
    app.register_blueprint(bp)


def job_accepted(queue: str) -> None:
    """A new job was recorded and published (``app.jobs.accept``)."""
    current_app.extensions["fleet_api_metrics"].accepted.labels(queue).inc()


def _started() -> None:
    g.fleet_request_started = time.perf_counter()
    current_app.extensions["fleet_api_metrics"].in_progress.inc()


def _answered(response: Response) -> Response:
    metrics: ApiMetrics = current_app.extensions["fleet_api_metrics"]
    route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
    started = g.get("fleet_request_started")
    metrics.requests.labels(route, request.method, str(response.status_code)).inc()
    if started is not None:
        metrics.latency.labels(route, request.method).observe(time.perf_counter() - started)
    if request.endpoint in SUBMIT_ENDPOINTS and response.status_code >= 400:
        metrics.rejected.labels(_error_code(response)).inc()
    return response


def _ended(_exc: BaseException | None) -> None:
    if g.pop("fleet_request_started", None) is not None:
        current_app.extensions["fleet_api_metrics"].in_progress.dec()


def _error_code(response: Response) -> str:
    """The ``error.code`` of an error body, else the status."""
    body = response.get_json(silent=True) if response.is_json else None
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) and code else str(response.status_code)


@bp.get("/metrics")
@operation(
    "Prometheus metrics: the backlog per queue",
    tag="meta",
    responses={200: response("Prometheus text format", {"type": "string"}, media="text/plain")},
)
def prometheus():
    return Response(generate_latest(current_app.extensions["fleet_metrics"]), mimetype=CONTENT_TYPE_LATEST)


@bp.get("/metrics/backlog")
@operation(
    "The backlog per queue as JSON (KEDA's metrics-api scaler)",
    tag="meta",
    responses={200: response("Queued, running and their sum, per queue", _BACKLOG), **errors(503)},
)
def backlog():
    svc = services()
    queues = svc.store.backlog(svc.registry.job_queues)
    models = {
        name: tuple(sum(counts) for counts in zip(*(queues[q] for q in svc.registry.queues(name)), strict=True))
        for name in svc.registry.names
    }
    return jsonify(
        {
            "queues": {q: _counts(a, b) for q, (a, b) in queues.items()},
            "models": {name: _counts(a, b) for name, (a, b) in models.items()},
            "backlog": sum(a + b for a, b in queues.values()),
        }
    )


def _counts(queued: int, running: int) -> dict[str, int]:
    return {"queued": queued, "running": running, "backlog": queued + running}
