"""How a worker in a slot picks its GPU and what its engine is told before torch loads;
what the job task answers Celery (and so Flower)."""

from __future__ import annotations

import pytest

from tasks.celery import GENERATE_TASK
from tasks.jobs import Job, JobState, new_job_id, parse_request
from tasks.settings import Settings
from tasks.store import now
from tests.helpers import FakeModel, fake_engine
from workers import celery as worker_celery
from workers.batcher import Batcher, BatchPolicy
from workers.celery import engine_config, slot_device
from workers.jobs import WorkerContext
from workers.metrics import WorkerMetrics
from workers.runner import ModelRunner


def test_a_slot_takes_the_slot_th_visible_gpu():
    """Slot N is GPU N, or the N-th of CUDA_VISIBLE_DEVICES when the host or runtime set it."""
    assert slot_device(1, None) == "1"
    assert slot_device(1, "4,6") == "6"
    assert slot_device(2, "4,6") == "-1", "more workers than visible GPUs: this one sees none"


def test_the_engine_is_pinned_and_given_its_compile_cache_before_torch_loads(tmp_path):
    """A slotted worker's engine gets CUDA_VISIBLE_DEVICES; compiled mode gets its caches."""
    settings = Settings(worker_slot=1, compile="reduce-overhead", compile_cache_dir=str(tmp_path))
    env = engine_config(settings).environment()
    assert env["CUDA_VISIBLE_DEVICES"] in ("1", "-1") or "," not in env["CUDA_VISIBLE_DEVICES"]
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    assert "CUDA_VISIBLE_DEVICES" not in engine_config(Settings(device="cpu", worker_slot=1)).environment()


def test_the_task_returns_its_jobs_summary_and_raises_for_a_failed_job(store, storage, settings, monkeypatch):
    """Flower shows the task's result (the batch, never the prompt) and lists a FAILED job
    among failed tasks."""
    runner = ModelRunner(fake_engine(FakeModel(fail_on="poison"), serves="tiny"), Batcher(BatchPolicy(8, 0)))
    runner.start(timeout_s=5)
    metrics = WorkerMetrics()
    context = WorkerContext(store=store, storage=storage, runner=runner, settings=settings, metrics=metrics)
    monkeypatch.setattr(worker_celery, "_context", context)

    def job(prompt: str) -> str:
        spec = parse_request({"prompt": prompt, "seed": 1, "width": 16, "height": 16}, Settings())
        record = Job(id=new_job_id(), state=JobState.QUEUED, spec=spec, created_at=now())
        store.create(record, publish_by=record.created_at + 60)
        return record.id

    try:
        generate = worker_celery.make_worker_app(settings).tasks[GENERATE_TASK]
        good = job("a private prompt")
        assert generate.run(good) == f"SUCCEEDED batch {store.get(good).batch.id} (1 image) on tiny"
        with pytest.raises(worker_celery.JobFailed, match=r"^FAILED \(pipeline_failed\)$"):
            generate.run(job("poison"))
        assert metrics.registry.get_sample_value("fleet_worker_jobs", {"queue": "unknown"}) == 0
    finally:
        runner.stop()
