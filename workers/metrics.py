"""Prometheus metrics of one worker: what batching achieved and where the time went.

Served on ``FLEET_WORKER_METRICS_PORT`` (+ the worker's slot). docs/OBSERVABILITY.md lists
every metric with its meaning; the dashboard (docs/grafana/fleet.json) queries them.

The fleet-wide backlog per queue (jobs queued plus running, from the job store) is the
API's ``fleet_backlog``: one number for the whole fleet, which N workers exporting it
again would only multiply. A worker exports its own share: the jobs it has taken, per
queue, and the images waiting in its batcher.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: For the stages a job can spend minutes in (the queue, its whole life).
_LONG_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_BATCH_IMAGES = (1, 2, 3, 4, 6, 8, 12, 16, 32)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, compile_mode: str = "off"):
        self.registry = registry or CollectorRegistry()
        self.compile_mode = compile_mode
        r = self.registry
        self.batch_images = Histogram("fleet_batch_images", "Images per model call", buckets=_BATCH_IMAGES, registry=r)
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
        self.queue_wait = Histogram(
            "fleet_queue_wait_seconds",
            "From a job's submission to a worker starting it (time in the broker)",
            buckets=_LONG_SECONDS,
            registry=r,
        )
        self.job_total = Histogram(
            "fleet_job_seconds",
            "From a job's submission to its images stored (succeeded jobs)",
            buckets=_LONG_SECONDS,
            registry=r,
        )
        self.images = Counter("fleet_images_total", "Images made by model calls that succeeded", registry=r)
        self.model_batches = Counter(
            "fleet_model_batches_total", "Model calls that ran, by model (its registry name)", ["model"], registry=r
        )
        self.model_loads = Counter(
            "fleet_model_loads_total",
            "Models the engine loaded, at start and in swaps (a worker serving several), by model",
            ["model"],
            registry=r,
        )
        self.model_load = Gauge(
            "fleet_model_load_seconds", "The last load of each model, warm-up included: what a swap costs", ["model"],
            registry=r,
        )  # fmt: skip
        self.batch_failures = Counter(
            "fleet_batch_failures_total",
            "Model calls that raised (the batch is split and retried), by reason",
            ["reason"],
            registry=r,
        )
        self.queue_depth = Gauge("fleet_batcher_waiting_images", "Images waiting in the batcher", registry=r)
        self.held = Gauge(
            "fleet_worker_jobs", "Jobs this worker has taken and not finished, by queue", ["queue"], registry=r
        )
        self.jobs = Counter("fleet_jobs_total", "Jobs finished by this worker", ["state"], registry=r)
        self.failures = Counter(
            "fleet_job_failures_total",
            "Jobs this worker ended FAILED, by reason (pipeline_failed, out_of_memory, crashed, storage, ...)",
            ["reason"],
            registry=r,
        )
        self.engine_restarts = Counter(
            "fleet_engine_restarts_total", "Engines started again after one died", registry=r
        )
        self.engine_start = Gauge(
            "fleet_engine_start_seconds",
            "The last engine start: loading the model (phase=load) and warming it, compiling included "
            "when FLEET_COMPILE is on (phase=warm)",
            ["phase", "compile"],
            registry=r,
        )
        self.device_memory = Gauge(
            "fleet_device_memory_bytes",
            "GPU memory of the engine after its last model call: allocated, reserved by the caching "
            "allocator, and the peak allocated during that call (CUDA only)",
            ["kind"],
            registry=r,
        )
        self.info = Gauge(
            "fleet_worker_info", "1 per running worker: its model and the queues it consumes", ["model", "queues"],
            registry=r,
        )  # fmt: skip

    # BatchObserver, called on the runner's threads
    def batch_done(
        self, images: int, wait_s: float, inference_s: float, canceled: bool = False, model: str = ""
    ) -> None:
        if model:
            self.model_batches.labels(model).inc()
        self.batch_images.observe(images)
        self.batch_wait.observe(wait_s)
        self.inference.observe(inference_s)
        if not canceled:
            self.images.inc(images)

    def batch_failed(self, out_of_memory: bool = False) -> None:
        self.batch_failures.labels("out_of_memory" if out_of_memory else "error").inc()

    def waiting(self, images: int) -> None:
        self.queue_depth.set(images)

    def engine_restarted(self) -> None:
        self.engine_restarts.inc()

    def engine_ready(self, load_s: float, warm_s: float) -> None:
        self.engine_start.labels("load", self.compile_mode).set(load_s)
        self.engine_start.labels("warm", self.compile_mode).set(warm_s)

    def model_loaded(self, model: str, load_s: float, warm_s: float) -> None:
        self.model_loads.labels(model).inc()
        self.model_load.labels(model).set(load_s + warm_s)

    def device_memory_used(self, allocated: int, reserved: int, peak: int) -> None:
        self.device_memory.labels("allocated").set(allocated)
        self.device_memory.labels("reserved").set(reserved)
        self.device_memory.labels("peak").set(peak)

    # the worker
    def started(self, model: str, queues: list[str]) -> None:
        self.info.labels(model, ",".join(sorted(queues))).set(1)
        for queue in queues:
            self.held.labels(queue).set(0)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        start_http_server(port, addr=host, registry=self.registry)
