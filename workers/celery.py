"""The worker's Celery app: the shared app plus the task body and lifecycle signals.

Run it with ``celery -A workers worker``. The threads pool is the default here: task
threads hand their job to the batcher and wait on the model thread, and no fork ever
happens after torch is loaded. Task threads and prefetch are sized from
``max_batch_images`` so the next batch is already reserved while one runs.
"""

from __future__ import annotations

import functools
import logging
import sys

import redis
from celery.exceptions import Reject
from celery.signals import celeryd_after_setup, worker_shutdown, worker_shutting_down

from tasks.celery import GENERATE_TASK, app
from tasks.settings import Settings, get_settings
from tasks.storage import make_storage
from tasks.store import JobStore
from workers.backends import load_model
from workers.batcher import Batcher, BatchPolicy
from workers.jobs import HandBack, WorkerContext, run_job
from workers.metrics import WorkerMetrics
from workers.runner import ModelRunner
from workers.sweeper import Sweeper

log = logging.getLogger(__name__)

_settings = get_settings()
app.conf.update(
    worker_pool="threads",
    worker_concurrency=_settings.task_threads,
    # threads pool: the worker reserves concurrency x multiplier messages.
    worker_prefetch_multiplier=1,
)

_context: WorkerContext | None = None
_sweeper: Sweeper | None = None


def batch_policy(settings: Settings, queue: str) -> BatchPolicy:
    policy = settings.policy_for(queue)
    return BatchPolicy(
        max_batch_images=policy.max_batch_images,
        max_wait_s=policy.max_wait_ms / 1000,
        kind=policy.batch_policy,
    )


#: How long a thread may hold the GIL while another waits for it. The model thread
#: re-takes the GIL after every torch op; with CPython's default 5 ms, task threads
#: encoding and uploading the last batch made each denoising step wait, and model calls
#: ran ~10% slower than bare (docs/BENCHMARKS.md). 0.5 ms removes most of that.
GIL_SWITCH_INTERVAL_S = 0.0005


def make_context(settings: Settings) -> WorkerContext:
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    metrics = WorkerMetrics()
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=30)
    store = JobStore(client, ttl_s=settings.job_ttl_s)
    # Batch keys are (queue, compat key): each queue batches under its own policy.
    policy_of = functools.lru_cache(maxsize=None)(lambda queue: batch_policy(settings, queue))
    batcher = Batcher(batch_policy(settings, settings.queue), policy_of=lambda key: policy_of(key[0]))
    runner = ModelRunner(
        lambda: load_model(settings.model_ref, settings.device, settings.dtype),
        warm_size=(settings.default_width, settings.default_height),
        batcher=batcher,
        observer=metrics,
        on_batch_start=store.enter_model,
        on_batch_end=store.leave_model,
    )
    runner.start()
    if settings.worker_metrics_port:
        metrics.serve(settings.worker_metrics_port)
    return WorkerContext(
        store=store,
        storage=make_storage(settings),
        runner=runner,
        settings=settings,
        metrics=metrics,
    )


# After logging is set up and before the consumer starts: no message is taken before
# the model is loaded and warm.
@celeryd_after_setup.connect
def _start_model(**_) -> None:
    global _context, _sweeper
    settings = get_settings()
    _context = make_context(settings)
    _sweeper = Sweeper(_context.store, app, settings)
    _sweeper.start()
    log.info("model %s ready", _context.runner.model_name)


@worker_shutting_down.connect
def _release_waiting_jobs(**_) -> None:
    """SIGTERM: the batch running now finishes; jobs not started go back to the queue."""
    if _context is not None:
        released = _context.runner.release_waiting()
        log.info("warm shutdown: handing back %d job(s) that had not started", released)


@worker_shutdown.connect
def _stop_model(**_) -> None:
    if _sweeper is not None:
        _sweeper.stop()
    if _context is not None:
        _context.runner.stop()


@app.task(name=GENERATE_TASK, bind=True)
def generate(self, job_id: str) -> str:
    assert _context is not None, "the celeryd_after_setup signal did not run"
    queue = (self.request.delivery_info or {}).get("routing_key") or ""
    try:
        return run_job(_context, job_id, worker=self.request.hostname or "", task_id=self.request.id or "", queue=queue)
    except HandBack as exc:
        log.warning("job %s handed back to the queue: %s", job_id, exc)
        raise Reject(str(exc), requeue=True) from exc
