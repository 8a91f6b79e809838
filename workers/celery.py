"""The worker's Celery app: the shared configuration plus the task body and lifecycle signals.

Run it with ``fleet worker`` (one per GPU: it picks a free slot, and with it the worker's
name, metrics port and GPU) or ``celery -A workers worker``, which finds ``app`` here: it
is made by ``make_worker_app`` on first access, never as a side effect of an import. The
threads pool is the default here: task threads hand their job to the runner and wait for
its images; the model itself runs in the engine process, spawned before the consumer
starts. Task threads and prefetch are sized from ``max_batch_images`` so the next batch is
already reserved while one runs.

A worker whose engine did not start (or whose metrics port is taken) exits before it
consumes a single message: it never takes jobs it cannot run.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any

import redis
from celery import Celery, Task
from celery.exceptions import Reject, WorkerShutdown
from celery.signals import celeryd_after_setup, worker_shutdown, worker_shutting_down

from tasks import probes
from tasks.celery import GENERATE_TASK, declare_queues, make_celery, use_threads_pool
from tasks.events import EventHub
from tasks.jobs import JobState
from tasks.logs import install_celery_logging, log_context, set_process_fields
from tasks.notify import Notifier
from tasks.registry import load_registry
from tasks.settings import Settings, get_settings
from tasks.storage import make_storage
from tasks.store import JobStore
from tasks.views import render
from workers.batcher import Batcher, BatchPolicy
from workers.cancels import CancelListener
from workers.engine_client import Engine, ProcessEngine, ThreadEngine
from workers.jobs import HandBack, WorkerContext, run_job
from workers.metrics import WorkerMetrics
from workers.presence import Presence
from workers.protocol import EngineConfig, ModelSpec
from workers.runner import ModelRunner, PendingJob
from workers.sweeper import Sweeper

log = logging.getLogger(__name__)

#: The worker process's own state, made once its consumer is set up (``_start_model``).
_context: WorkerContext | None = None
_sweeper: Sweeper | None = None
_presence: Presence | None = None


def make_worker_app(settings: Settings) -> Celery:
    """The GPU worker's app: the shared configuration, a threads pool sized for batching,
    the job task, and the signals that start and stop the engine around the consumer."""
    install_celery_logging(settings.log_format, "worker")
    app = make_celery(settings)
    # The served model's queues (``celery worker -Q`` still chooses others).
    app.amqp.queues.select(load_registry(settings).served_queues(settings.serve))
    use_threads_pool(app, settings.task_threads)
    app.task(name=GENERATE_TASK, bind=True, throws=(JobFailed,))(generate)
    # The ready file a Kubernetes readiness probe reads (tasks/probes.py): there once the
    # consumer starts, i.e. after _start_model has the engine's model loaded and warm.
    # Connected first: its setup handler clears a stale file before an engine that cannot
    # start stops the worker.
    probes.connect()
    # After logging is set up and before the consumer starts: no message is taken before
    # the engine's model is loaded and warm.
    celeryd_after_setup.connect(_start_model, weak=False, dispatch_uid="fleet-worker-start")
    worker_shutting_down.connect(_release_waiting_jobs, weak=False, dispatch_uid="fleet-worker-release")
    worker_shutdown.connect(_stop_model, weak=False, dispatch_uid="fleet-worker-stop")
    return app


@functools.cache
def worker_app() -> Celery:
    return make_worker_app(get_settings())


def __getattr__(name: str) -> Celery:
    """``app``, what ``celery -A workers`` looks for, made when first asked for."""
    if name == "app":
        return worker_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def batch_policy(settings: Settings, queue: str) -> BatchPolicy:
    policy = settings.policy_for(queue)
    return BatchPolicy(
        max_batch_images=policy.max_batch_images,
        max_wait_s=policy.max_wait_ms / 1000,
        kind=policy.batch_policy,
        batching=policy.batching,
    )


#: How long a thread may hold the GIL while another waits for it. With
#: ``FLEET_ENGINE=thread`` the model thread re-takes the GIL after every torch op; with
#: CPython's default 5 ms, task threads encoding and uploading the last batch made each
#: denoising step wait, and model calls ran ~10% slower than bare (docs/BENCHMARKS.md).
GIL_SWITCH_INTERVAL_S = 0.0005

#: Exit status of a worker that could not start its engine or bind its ports.
EXIT_NOT_STARTED = 3


def engine_config(settings: Settings) -> EngineConfig:
    env = {}
    if settings.worker_slot is not None and settings.device in ("auto", "cuda"):
        env["CUDA_VISIBLE_DEVICES"] = slot_device(settings.worker_slot, os.environ.get("CUDA_VISIBLE_DEVICES"))
    models = tuple(
        ModelSpec(
            ref=model.path,
            name=model.name,
            dtype=model.dtype,
            quantize=model.quantize,
            warm=settings.warm_shapes_for(model.width, model.height),
            loras=model.loras,
        )
        for model in load_registry(settings).served(settings.serve)
    )
    return EngineConfig(
        models,
        device=settings.device,
        compile=settings.compile,
        compile_cache_dir=str(settings.compile_cache.resolve()),
        env=tuple(env.items()),
        log_format=settings.log_format,
        memory_budget=settings.model_memory_mb * 2**20,
    )


def slot_device(slot: int, visible: str | None) -> str:
    """The GPU a worker in ``slot`` is pinned to: the slot-th of those this host (or the
    container runtime) made visible, else GPU ``slot`` itself."""
    devices = [d.strip() for d in visible.split(",") if d.strip()] if visible else []
    if not devices:
        return str(slot)
    if slot >= len(devices):
        return "-1"  # more workers than visible GPUs: this one sees none and says so
    return devices[slot]


def make_context(settings: Settings, celery_app: Celery) -> WorkerContext:
    metrics = WorkerMetrics(compile_mode=settings.compile)
    if settings.metrics_port:
        try:
            metrics.serve(settings.metrics_port)
        except OSError as exc:
            raise RuntimeError(
                f"the worker's metrics port {settings.metrics_port} is taken ({exc.strerror}): another worker "
                "runs here. Start each worker with `fleet worker` (it picks a free slot), or set "
                "FLEET_WORKER_METRICS_PORT (0 turns it off)"
            ) from exc
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=30)
    store, storage = JobStore(client, ttl_s=settings.job_ttl_s), make_storage(settings)
    notifier = Notifier(store, celery_app, settings, lambda job: render(job, storage))
    policy_of = functools.lru_cache(maxsize=None)(lambda queue: batch_policy(settings, queue))
    batcher = Batcher[PendingJob](batch_policy(settings, settings.queue), policy_of=policy_of)
    engine: Engine
    if settings.engine == "thread":
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        engine = ThreadEngine(engine_config(settings))
    else:
        engine = ProcessEngine(engine_config(settings))
    runner = ModelRunner(
        engine,
        batcher,
        observer=metrics,
        on_batch_start=store.enter_model,
        on_batch_end=store.leave_model,
        on_engine_lost=_shut_down,
        on_batch_step=lambda ids, step, total: notifier.progressed(store.progress(ids, step, total), step, total),
    )
    runner.start()
    cancels = CancelListener(EventHub(lambda: client), runner)
    cancels.start()
    return WorkerContext(
        store=store,
        storage=storage,
        runner=runner,
        settings=settings,
        metrics=metrics,
        uploads=ThreadPoolExecutor(settings.upload_threads, thread_name_prefix="upload"),
        cancels=cancels,
    )


def _shut_down(reason: str) -> None:
    """No engine can start: a warm shutdown hands every job back, and the worker exits
    for its supervisor to restart (Kubernetes, systemd)."""
    log.critical("stopping the worker: %s", reason)
    os.kill(os.getpid(), signal.SIGTERM)


def _start_model(sender: str = "", instance: Any = None, **_: Any) -> None:
    global _context, _sweeper, _presence
    settings = get_settings()
    set_process_fields(worker=sender)
    try:
        _context = make_context(settings, instance.app if instance is not None else worker_app())
    except Exception as exc:
        # Celery logs and swallows an ordinary exception from a signal handler and starts
        # consuming anyway; a worker that cannot run jobs must not take any.
        log.critical("the worker cannot start: %s", exc)
        raise WorkerShutdown(EXIT_NOT_STARTED) from exc
    if settings.broker_is_amqp and instance is not None:
        try:
            declare_queues(instance.app, settings.publish_timeout_s)
        except Exception as exc:  # the consumer reconnects on its own; only the binding waits
            log.warning("could not declare the queues on the broker yet: %s", exc)
    consumed = instance.app.amqp.queues.consume_from if instance is not None else {}
    registry = load_registry(settings)
    served = ",".join(model.name for model in registry.served(settings.serve))  # what requests say
    queues = sorted(consumed or registry.served_queues(settings.serve))
    if _context.metrics is not None:
        _context.metrics.started(served, queues)
    _presence = Presence(_context.store, sender, queues, settings.task_threads)
    _presence.start()
    _sweeper = Sweeper(_context.store, instance.app if instance is not None else worker_app(), settings)
    _sweeper.start()
    # `fleet worker`'s callers (tests/stack.py) read the worker's name from this line.
    log.info("worker %s: model %s ready in engine pid %s", sender, served, _context.runner.engine_pid)


def _release_waiting_jobs(**_: Any) -> None:
    """SIGTERM: the batch running now finishes; jobs not started go back to the queue."""
    _withdraw()
    if _context is not None:
        released = _context.runner.release_waiting()
        log.info("warm shutdown: handing back %d job(s) that had not started", released)


def _withdraw() -> None:
    """The worker takes no more jobs: queued jobs stop counting on its threads."""
    global _presence
    if _presence is not None:
        _presence.stop()
        _presence = None


def _stop_model(**_: Any) -> None:
    _withdraw()
    if _sweeper is not None:
        _sweeper.stop()
    if _context is not None:
        if _context.cancels is not None:
            _context.cancels.stop()
        _context.runner.stop()
        if _context.uploads is not None:
            _context.uploads.shutdown()


class JobFailed(Exception):
    """The task of a job that ended FAILED raises this, so Flower lists it among failed
    tasks. Its message is the job's summary (a reason code, never the prompt); the job
    record has the full error. Expected (``throws``): logged without a traceback, and the
    message is acknowledged like any other."""


def generate(self: Task[Any, str], job_id: str) -> str:
    """Run one job. The result is what Flower shows beside the task (whose id is the job's
    id): its state and the batch it ran in, e.g. ``SUCCEEDED batch 4242-17 (8 images)``;
    never the prompt. A job that ended FAILED raises ``JobFailed`` instead."""
    assert _context is not None, "the celeryd_after_setup signal did not run"
    queue = (self.request.delivery_info or {}).get("routing_key") or ""
    metrics = _context.metrics
    held = metrics.held.labels(queue or "unknown").track_inprogress() if metrics else nullcontext()
    with log_context(job_id=job_id), held:
        try:
            outcome = run_job(
                _context, job_id, worker=self.request.hostname or "", task_id=self.request.id or "", queue=queue
            )
        except HandBack as exc:
            log.warning("job %s handed back to the queue: %s", job_id, exc)
            raise Reject(str(exc), requeue=True) from exc
    if outcome.state is JobState.FAILED:
        raise JobFailed(outcome.summary())
    return outcome.summary()
