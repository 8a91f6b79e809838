"""The whole path over HTTP against real processes: submit, generate, store in S3,
download through presigned URLs with a plain HTTP client."""

from __future__ import annotations

import io
import time

import pytest
import requests
from PIL import Image

from tasks.keyspace import CONSUMER_THREADS_KEY, CONSUMERS_PREFIX
from tasks.registry import load_registry
from tests.helpers import download, submit, wait_done

pytestmark = pytest.mark.e2e


def test_jobs_of_several_shapes_succeed_and_download_as_pngs_of_their_size(api_url):
    shapes = [(64, 64, 1), (128, 64, 2), (64, 96, 1)]
    ids = [
        submit(api_url, prompt=f"test {i}", width=w, height=h, num_images=n, seed=i, steps=6)
        for i, (w, h, n) in enumerate(shapes)
    ]
    for job_id, (width, height, count) in zip(ids, shapes, strict=True):
        job = wait_done(api_url, job_id)
        assert job["state"] == "SUCCEEDED", job["error"]
        assert len(job["images"]) == count
        for blob in download(job):
            image = Image.open(io.BytesIO(blob))
            assert (image.format, image.size) == ("PNG", (width, height))
        timings = job["timings"]
        assert timings["queue_wait_s"] >= 0 and timings["inference_s"] > 0 and timings["upload_s"] >= 0
        assert job["started_at"] and job["finished_at"] and job["worker"].startswith("test-worker@")
        assert all(0 < image["expires_in_s"] <= 7 * 24 * 3600 for image in job["images"])


def test_the_same_seed_gives_the_same_bytes(api_url):
    body = {"prompt": "a lighthouse at dusk", "seed": 1234, "steps": 6}
    first, second = (wait_done(api_url, submit(api_url, **body)) for _ in range(2))
    other = wait_done(api_url, submit(api_url, **{**body, "seed": 4321}))
    assert download(first) == download(second)
    assert download(first) != download(other)


def test_the_record_shows_the_request_with_defaults_filled_in(api_url, settings):
    job = wait_done(api_url, submit(api_url, prompt="defaults"))
    request = job["request"]
    assert (request["width"], request["height"], request["steps"]) == (
        settings.default_width,
        settings.default_height,
        settings.default_steps,
    )
    assert isinstance(request["seed"], int)


def test_the_view_clients_get_is_the_record_the_fleet_keeps(api_url, store):
    """The API's job view, read back as the load generator does, names the stored image keys,
    and the OpenAPI document describes it from the same model."""
    from tasks.views import JobView

    job_id = submit(api_url, prompt="view", num_images=2, seed=3, steps=4)
    view = JobView.model_validate(wait_done(api_url, job_id))
    record = store.get(job_id)
    assert view.to_job().image_keys == record.image_keys == [f"jobs/{job_id}/0.png", f"jobs/{job_id}/1.png"]
    assert view.to_job().timings == record.timings and view.batch.images == record.batch.images
    schemas = requests.get(f"{api_url}/openapi.json", timeout=10).json()["components"]["schemas"]
    assert set(schemas["Job"]["properties"]) == set(JobView.model_fields)


def test_a_running_worker_announces_its_queues_and_threads(worker, redis_client, settings):
    """The session worker is in the store as a consumer of its queues, with its task threads."""
    for queue in load_registry(settings).job_queues:
        consumers = redis_client.zrangebyscore(CONSUMERS_PREFIX + queue, time.time(), "+inf")
        assert any(name.startswith(b"test-worker@") for name in consumers), (queue, consumers)
    threads = {k.decode(): int(v) for k, v in redis_client.hgetall(CONSUMER_THREADS_KEY).items()}
    assert any(name.startswith("test-worker@") and n == settings.task_threads for name, n in threads.items())
