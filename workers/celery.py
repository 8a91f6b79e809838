"""The worker's Celery app: the shared app plus the task body and lifecycle signals.

Run it with ``celery -A workers worker``. The threads pool is the default here: task
threads wait on the model thread, and no fork ever happens after torch is loaded.
"""

from __future__ import annotations

import logging

import redis
from celery.signals import worker_init, worker_shutdown

from tasks.celery import GENERATE_TASK, app
from tasks.settings import get_settings
from tasks.storage import make_storage
from tasks.store import JobStore
from workers.jobs import WorkerContext, run_job
from workers.pipeline import DiffusersModel
from workers.runner import ModelRunner

log = logging.getLogger(__name__)

_settings = get_settings()
app.conf.update(
    worker_pool="threads",
    worker_concurrency=_settings.worker_threads,
    worker_prefetch_multiplier=1,
)

_context: WorkerContext | None = None


def make_context() -> WorkerContext:
    settings = get_settings()
    runner = ModelRunner(
        lambda: DiffusersModel.load(settings.model_ref, settings.device, settings.dtype),
        warm_size=(settings.default_width, settings.default_height),
    )
    runner.start()
    return WorkerContext(
        store=JobStore(redis.Redis.from_url(settings.redis_url), ttl_s=settings.job_ttl_s),
        storage=make_storage(settings),
        runner=runner,
        model_name=runner.model_name,
    )


@worker_init.connect
def _start_model(**_) -> None:
    global _context
    _context = make_context()
    log.info("model %s ready", _context.model_name)


@worker_shutdown.connect
def _stop_model(**_) -> None:
    if _context is not None:
        _context.runner.stop()


@app.task(name=GENERATE_TASK, bind=True)
def generate(self, job_id: str) -> str:
    assert _context is not None, "the worker_init signal did not run"
    return run_job(_context, job_id, worker=self.request.hostname or "", task_id=self.request.id or "")
