"""Prometheus metrics of one worker: what batching achieved and where the time went."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.batch_images = Histogram(
            "fleet_batch_images", "Images per model call", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r
        )
        self.batch_wait = Histogram(
            "fleet_batch_wait_seconds",
            "From a job reaching the batcher to its model call starting",
            buckets=_SECONDS,
            registry=r,
        )
        self.inference = Histogram(
            "fleet_inference_seconds", "Duration of one model call", buckets=_SECONDS, registry=r
        )
        self.upload = Histogram(
            "fleet_upload_seconds", "Encoding and uploading one job's PNGs", buckets=_SECONDS, registry=r
        )
        self.batch_failures = Counter("fleet_batch_failures_total", "Model calls that raised", registry=r)
        self.queue_depth = Gauge("fleet_batcher_waiting_images", "Images waiting in the batcher", registry=r)
        self.jobs = Counter("fleet_jobs_total", "Jobs finished by this worker", ["state"], registry=r)
        self.engine_restarts = Counter(
            "fleet_engine_restarts_total", "Engines started again after one died", registry=r
        )
        self.engine_start = Gauge(
            "fleet_engine_start_seconds", "Loading and warming (compiling) the model", ["phase"], registry=r
        )

    # BatchObserver, called on the model thread
    def batch_done(self, images: int, wait_s: float, inference_s: float) -> None:
        self.batch_images.observe(images)
        self.batch_wait.observe(wait_s)
        self.inference.observe(inference_s)

    def batch_failed(self) -> None:
        self.batch_failures.inc()

    def waiting(self, images: int) -> None:
        self.queue_depth.set(images)

    def engine_restarted(self) -> None:
        self.engine_restarts.inc()

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        start_http_server(port, addr=host, registry=self.registry)
