"""Service classes and priorities, output formats and webhooks, through the real API,
worker, Redis, S3 and ``fleet hooks``."""

from __future__ import annotations

import io
import json

import pytest
import requests
from PIL import Image

from fleet.processes import wait_for
from tasks.celery import redis_priority
from tasks.settings import Settings
from tasks.webhooks import webhook_secret
from tests.helpers import http, submit, wait_done
from tests.tasks.test_webhooks import Receiver

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    ("fmt", "pil", "content_type"), [("jpeg", "JPEG", "image/jpeg"), ("webp", "WEBP", "image/webp")]
)
def test_images_come_in_the_format_asked_for(api_url, fmt, pil, content_type):
    job = wait_done(api_url, submit(api_url, prompt="formats", steps=2, output_format=fmt, output_quality=80))
    assert job["state"] == "SUCCEEDED", job["error"]
    download = requests.get(job["images"][0]["url"], timeout=10)
    assert download.headers["Content-Type"] == content_type
    assert Image.open(io.BytesIO(download.content)).format == pil


def test_a_quality_out_of_bounds_is_refused(api_url):
    response = http.post(f"{api_url}/v1/jobs", json={"prompt": "x", "output_quality": 101}, timeout=10)
    assert response.status_code == 422 and response.json()["error"]["field"] == "output_quality"


def test_a_job_samples_with_the_scheduler_it_asks_for(api_url):
    """The same seed under two samplers: both succeed, each says which it ran, and their
    images differ; an unknown sampler is a 422 naming ``scheduler``."""
    body = {"prompt": "samplers", "steps": 3, "seed": 11}
    jobs = [wait_done(api_url, submit(api_url, **body, scheduler=name)) for name in ("UniPCMultistepScheduler", None)]
    assert [job["state"] for job in jobs] == ["SUCCEEDED"] * 2, [job["error"] for job in jobs]
    assert [job["request"]["scheduler"] for job in jobs] == ["UniPCMultistepScheduler", None]
    images = [requests.get(job["images"][0]["url"], timeout=10).content for job in jobs]
    assert images[0] != images[1]
    response = http.post(f"{api_url}/v1/jobs", json={"prompt": "x", "scheduler": "k_euler"}, timeout=10)
    assert response.status_code == 422 and response.json()["error"]["field"] == "scheduler"


def test_the_batch_class_has_its_own_queue_and_runs(api_url, settings):
    job = wait_done(api_url, submit(api_url, prompt="bulk", steps=2, service_class="batch"))
    assert job["state"] == "SUCCEEDED" and job["queue"] == settings.batch_queue
    response = http.post(f"{api_url}/v1/jobs", json={"prompt": "x", "service_class": "vip"}, timeout=10)
    assert response.status_code == 422 and response.json()["error"]["field"] == "service_class"


def test_a_higher_priority_goes_ahead_in_line_and_on_the_broker(idle_api, redis_client):
    low = [submit(idle_api, prompt="low") for _ in range(2)]
    assert redis_priority(9) == 0 and redis_priority(0) == 9
    urgent_list = "fleet.idle"  # priority 0 on the Redis transport: the queue's own list, read first
    before = redis_client.llen(urgent_list)
    high = submit(idle_api, prompt="high", priority=9)
    assert redis_client.llen(urgent_list) == before + 1  # the broker's first list
    try:
        place = {i: http.get(f"{idle_api}/v1/jobs/{i}", timeout=10).json()["place_in_line"]["position"]
                 for i in low + [high]}  # fmt: skip
        assert place[high] < place[low[0]] < place[low[1]]
    finally:
        for job_id in low + [high]:
            http.post(f"{idle_api}/v1/jobs/{job_id}/cancel", timeout=10)
    response = http.post(f"{idle_api}/v1/jobs", json={"prompt": "x", "priority": 10}, timeout=10)
    assert response.status_code == 422 and response.json()["error"]["field"] == "priority"


@pytest.fixture(scope="module")
def receiver():
    receiver = Receiver(webhook_secret(Settings(), "dev"))  # the development key's secret
    yield receiver
    receiver.close()


def test_webhooks_tell_start_progress_and_completion_each_once_and_signed(api_url, hooks, receiver):
    job_id = submit(api_url, prompt="hooked", steps=6, webhook=receiver.url("/ok"))
    wait_done(api_url, job_id)

    def events() -> list[dict]:
        return [json.loads(r.body) for r in receiver.hits("/ok") if json.loads(r.body)["data"]["id"] == job_id]

    wait_for(lambda: any(e["type"] == "completed" for e in events()), 30, "completed webhook")
    got = events()
    assert [e["type"] for e in got if e["type"] != "progress"] == ["start", "completed"]
    assert got[-1]["data"]["state"] == "SUCCEEDED" and got[-1]["data"]["images"]
    progress = [e["data"]["step"] for e in got if e["type"] == "progress"]
    assert progress and progress[-1] == 6
    ours = [r for r in receiver.hits("/ok") if json.loads(r.body)["data"]["id"] == job_id]
    assert all(r.valid for r in ours) and len({r.id for r in ours}) == len(ours)


def test_a_completed_only_webhook_hears_a_cancel(idle_api, hooks, receiver):
    body = {"prompt": "x", "webhook": receiver.url("/ok"), "webhook_events": ["completed"]}
    job_id = http.post(f"{idle_api}/v1/jobs", json=body, timeout=10).json()["id"]
    http.post(f"{idle_api}/v1/jobs/{job_id}/cancel", timeout=10)

    def mine() -> list[dict]:
        return [json.loads(r.body) for r in receiver.hits("/ok") if json.loads(r.body)["data"]["id"] == job_id]

    wait_for(lambda: mine(), 30, "completed webhook")
    assert [e["type"] for e in mine()] == ["completed"] and mine()[0]["data"]["state"] == "CANCELED"


def test_a_webhook_to_a_private_literal_address_is_refused_where_not_allowed(idle_api):
    # the test fleet allows loopback receivers; the default refuses them at submit
    from tasks.webhooks import check_webhook_url

    with pytest.raises(Exception) as refused:
        check_webhook_url("http://169.254.169.254/latest", Settings())
    assert getattr(refused.value, "field", None) == "webhook"
