"""Running a job on the worker side against real Redis and S3: records finish with timings
and stored PNGs, failures carry a reason, and a duplicate delivery does nothing twice."""

from __future__ import annotations

import dataclasses
import io
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from tasks.jobs import Job, JobState, new_job_id, parse_request
from tasks.settings import Settings
from tasks.store import now
from tests.helpers import FakeModel, fake_engine
from workers.batcher import Batcher, BatchPolicy
from workers.jobs import WorkerContext, run_job
from workers.runner import ModelRunner


@pytest.fixture(scope="module")
def context(store, storage, settings):
    runner = ModelRunner(fake_engine(FakeModel(fail_on="poison"), serves="tiny"), Batcher(BatchPolicy(8, 0)))
    runner.start(timeout_s=5)
    yield WorkerContext(store=store, storage=storage, runner=runner, settings=settings)
    runner.stop()


def submit(store, **body) -> Job:
    spec = parse_request({"seed": 1, "width": 16, "height": 24, **body}, Settings())
    job = Job(id=new_job_id(), state=JobState.QUEUED, spec=spec, created_at=now())
    store.create(job, publish_by=job.created_at + 60)
    return job


def test_a_job_succeeds_with_its_pngs_stored_and_timings_recorded(context, store, storage):
    job = submit(store, prompt="a", num_images=2)
    assert run_job(context, job.id, worker="w1", task_id="t1").state is JobState.SUCCEEDED
    record = store.get(job.id)
    assert record.state is JobState.SUCCEEDED and record.attempts == 1
    assert record.image_keys == [f"jobs/{job.id}/0.png", f"jobs/{job.id}/1.png"]
    assert (record.worker, record.task_id) == ("w1", "t1")
    timings = record.timings
    assert all(v is not None and v >= 0 for v in vars(timings).values())
    assert timings.total_s >= timings.inference_s
    image = Image.open(io.BytesIO(storage.get(record.image_keys[1])))
    assert image.format == "PNG" and image.size == (16, 24)


def test_a_pipeline_failure_fails_the_job_with_a_reason(context, store):
    job = submit(store, prompt="poison")
    outcome = run_job(context, job.id, worker="w1")
    assert (outcome.state, outcome.reason) == (JobState.FAILED, "pipeline_failed")
    record = store.get(job.id)
    assert record.state is JobState.FAILED and "bad prompt" in record.error and record.finished_at


def test_the_outcome_names_the_batch_and_never_the_prompt(context, store):
    """The task's result (what Flower shows) says the state, batch id and its size; a
    duplicate delivery says the same batch from the record, and that it did nothing."""
    job = submit(store, prompt="a secret prompt", num_images=2)
    first = run_job(context, job.id, worker="w1")
    record = store.get(job.id)
    assert first.summary() == f"SUCCEEDED batch {record.batch.id} (2 images) on tiny"
    again = run_job(context, job.id, worker="w2")
    assert again.summary() == f"SUCCEEDED batch {record.batch.id} (2 images) on tiny, duplicate delivery"
    failed = run_job(context, submit(store, prompt="poison").id, worker="w1")
    assert failed.summary() == "FAILED (pipeline_failed)"
    assert all("prompt" not in o.summary() and "poison" not in o.summary() for o in (first, again, failed))


def test_a_duplicate_delivery_of_a_finished_job_does_nothing(context, store):
    job = submit(store, prompt="a")
    run_job(context, job.id, worker="w1")
    first = store.get(job.id)
    assert run_job(context, job.id, worker="w2").state is JobState.SUCCEEDED
    assert store.get(job.id) == first


def test_a_message_for_an_expired_job_is_dropped(context):
    assert run_job(context, new_job_id(), worker="w1").state is None


def test_the_images_of_a_job_are_stored_side_by_side_at_the_configured_png_level(context, store, storage):
    """A multi-image job's PNGs go through the upload pool, at FLEET_PNG_COMPRESS_LEVEL."""
    sizes = {}
    for level in (0, 9):
        ctx = dataclasses.replace(
            context,
            settings=context.settings.model_copy(update={"png_compress_level": level}),
            uploads=ThreadPoolExecutor(4),
        )
        job = submit(store, prompt="levels", num_images=3)
        assert run_job(ctx, job.id, worker="w1").state is JobState.SUCCEEDED
        sizes[level] = [len(storage.get(key)) for key in store.get(job.id).image_keys]
        ctx.uploads.shutdown()
    assert all(size >= 16 * 24 * 3 for size in sizes[0]), "level 0 stores the raw pixels"
    assert max(sizes[9]) < min(sizes[0]) / 4
