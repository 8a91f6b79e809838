"""A worker's Prometheus metrics: images and batch sizes from its model calls, failures by
reason, the engine's load and warm time, GPU memory when the model reports it, and the
jobs it holds per queue."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from tasks.jobs import Job, JobState, new_job_id, parse_request
from tasks.settings import Settings
from tasks.store import now
from tests.helpers import FakeModel, fake_engine
from workers.batcher import Batcher, BatchPolicy
from workers.jobs import WorkerContext, run_job
from workers.metrics import WorkerMetrics
from workers.runner import ModelRunner
from workers.work import CompatKey, ImageWork

KEY = CompatKey("fake", 8, 8, 1, 1.0)


class GpuModel(FakeModel):
    """Reports device memory as the CUDA pipeline does."""

    def memory_stats(self):
        return (100, 200, 150)


def value(metrics: WorkerMetrics, name: str, **labels) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def test_model_calls_count_images_batch_sizes_failures_and_memory():
    metrics = WorkerMetrics(compile_mode="reduce-overhead")
    runner = ModelRunner(fake_engine(GpuModel(fail_on="bad")), Batcher(BatchPolicy(4, 0.2)), observer=metrics)
    runner.start(timeout_s=5)
    try:
        futures = [runner.submit(KEY, [ImageWork("ok", None, i)]) for i in range(3)]
        [f.result(5) for f in futures]
        with pytest.raises(Exception, match="bad prompt"):
            runner.submit(KEY, [ImageWork("bad", None, 0)]).result(5)
    finally:
        runner.stop()
    assert value(metrics, "fleet_images_total") == 3
    assert value(metrics, "fleet_batch_images_count") == 1 and value(metrics, "fleet_batch_images_sum") == 3
    assert value(metrics, "fleet_batch_failures_total", reason="error") == 1
    assert value(metrics, "fleet_device_memory_bytes", kind="peak") == 150
    assert value(metrics, "fleet_device_memory_bytes", kind="reserved") == 200
    assert value(metrics, "fleet_engine_start_seconds", phase="load", compile="reduce-overhead") >= 0
    assert metrics.registry.get_sample_value(
        "fleet_engine_start_seconds", {"phase": "warm", "compile": "reduce-overhead"}
    ) is not None  # fmt: skip


def test_the_worker_says_its_model_and_queues_and_holds_none_at_start():
    metrics = WorkerMetrics()
    metrics.started("tiny", ["fleet.interactive", "fleet.batch"])
    text = generate_latest(metrics.registry).decode()
    assert 'fleet_worker_info{model="tiny",queues="fleet.batch,fleet.interactive"} 1.0' in text
    assert 'fleet_worker_jobs{queue="fleet.batch"} 0.0' in text


def test_jobs_count_by_state_failures_by_reason_and_their_waits(store, storage, settings):
    metrics = WorkerMetrics()
    runner = ModelRunner(
        fake_engine(FakeModel(fail_on="poison"), serves="tiny"), Batcher(BatchPolicy(8, 0)), observer=metrics
    )
    runner.start(timeout_s=5)
    ctx = WorkerContext(store=store, storage=storage, runner=runner, settings=settings, metrics=metrics)
    try:
        for prompt in ("fine", "poison", "fine"):
            spec = parse_request({"prompt": prompt, "seed": 1, "width": 16, "height": 16}, Settings())
            job = Job(id=new_job_id(), state=JobState.QUEUED, spec=spec, created_at=now())
            store.create(job, publish_by=job.created_at + 60)
            run_job(ctx, job.id, worker="w1")
    finally:
        runner.stop()
    assert value(metrics, "fleet_jobs_total", state="SUCCEEDED") == 2
    assert value(metrics, "fleet_jobs_total", state="FAILED") == 1
    assert value(metrics, "fleet_job_failures_total", reason="pipeline_failed") == 1
    assert value(metrics, "fleet_queue_wait_seconds_count") == 3
    assert value(metrics, "fleet_job_seconds_count") == 2
    assert value(metrics, "fleet_upload_seconds_count") == 2
