"""What autoscalers and Prometheus read from the API: the fleet's true backlog per queue.

``GET /metrics`` (Prometheus text) and ``GET /metrics/backlog`` (JSON, for KEDA's
metrics-api scaler) count, per job queue, the jobs QUEUED and the jobs RUNNING (taken by
a worker: in its batcher or its model call) from the job store. The broker's queue length
misses the second kind: Redis hands prefetched messages out of its list, and RabbitMQ's
ready count leaves out unacknowledged ones, so scaling on it alone under-counts and can
take away a worker in the middle of its batch. Both routes are unauthenticated, for the
cluster's scrapers: expose them inside the cluster only (docs/KUBERNETES.md).
"""

from __future__ import annotations

from flask import Blueprint, Flask, Response, current_app, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

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
    "required": ["queues", "backlog"],
    "properties": {
        "queues": {"type": "object", "additionalProperties": _COUNTS},
        "backlog": {"type": "integer", "minimum": 0},
    },
}


class BacklogCollector:
    """Reads the backlog from the job store at each scrape (nothing cached, nothing to
    keep right across gunicorn's processes)."""

    def __init__(self, svc: Services):
        self._svc = svc

    def collect(self):
        backlog = self._svc.store.backlog(self._svc.settings.job_queues)
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
    """Serve the metrics of ``svc`` from ``app``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BacklogCollector(svc))
    app.extensions["fleet_metrics"] = registry
    app.register_blueprint(bp)


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
    queues = svc.store.backlog(svc.settings.job_queues)
    return jsonify(
        {
            "queues": {q: {"queued": a, "running": b, "backlog": a + b} for q, (a, b) in queues.items()},
            "backlog": sum(a + b for a, b in queues.values()),
        }
    )
