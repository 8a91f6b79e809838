"""The API answers every bad request with a JSON error naming the field, enqueues nothing
for it, and reports its dependencies honestly (real Redis and S3 behind it)."""

from __future__ import annotations

import json

import pytest

from app import create_app
from fleet.processes import free_port
from tasks.celery import PRIORITY_SEP, queued_messages, redis_priority
from tasks.jobs import JobState
from tasks.keys import DEV_KEY
from tasks.keyspace import KEY_PREFIX


@pytest.fixture
def api_settings(settings):
    # A queue no worker consumes, so what the API enqueued can be counted.
    return settings.model_copy(update={"queue": "api-tests"})


@pytest.fixture
def client(api_settings):
    return authed(create_app({"SETTINGS": api_settings, "TESTING": True}))


def authed(app):
    """A test client that sends the development key."""
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {DEV_KEY}"
    return client


@pytest.fixture
def queue_length(redis_client, api_settings):
    return lambda: queued_messages(redis_client, api_settings.queue)


def job_count(redis_client) -> int:
    return sum(1 for _ in redis_client.scan_iter(f"{KEY_PREFIX}*"))


def assert_error(response, status: int, field: str | None):
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert set(error) == {"code", "message", "field"}
    assert error["field"] == field and error["message"]


@pytest.mark.parametrize(
    "body, status, field",
    [
        ({"prompt": "a", "width": 65}, 422, "width"),
        ({"prompt": "a", "steps": 10_000}, 422, "steps"),
        ({"prompt": "a", "num_images": 100}, 422, "num_images"),
        ({"prompt": ""}, 422, "prompt"),
        ({"prompt": "a", "unknown": 1}, 422, "unknown"),
        ({"prompt": "a", "width": 1024, "height": 1024}, 422, "width"),
        ({"prompt": "a\x00b"}, 422, "prompt"),
        ({"prompt": "a\ud800"}, 422, "prompt"),  # cannot be stored: it was a 500
        ([1, 2], 422, None),
    ],
)
def test_invalid_jobs_are_rejected_and_nothing_is_enqueued(client, redis_client, queue_length, body, status, field):
    before = (queue_length(), job_count(redis_client))
    assert_error(client.post("/v1/jobs", json=body), status, field)
    assert (queue_length(), job_count(redis_client)) == before


def test_malformed_json_is_a_400(client, queue_length):
    before = queue_length()
    response = client.post("/v1/jobs", data=b"{not json", content_type="application/json")
    assert_error(response, 400, None)
    assert queue_length() == before


def test_a_body_nested_too_deeply_for_the_parser_is_a_400(client):
    response = client.post("/v1/jobs", data=b"[" * 30_000 + b"]" * 30_000, content_type="application/json")
    assert_error(response, 400, None)


def test_a_body_over_the_limit_is_a_413(client, settings):
    response = client.post("/v1/jobs", json={"prompt": "x" * (settings.max_body_bytes + 1)})
    assert_error(response, 413, None)


def test_a_non_json_body_is_a_415(client):
    assert_error(client.post("/v1/jobs", data="prompt=a", content_type="text/plain"), 415, None)


def test_an_unknown_job_is_a_404(client):
    assert_error(client.get("/v1/jobs/" + "0" * 32), 404, "job_id")
    assert_error(client.get("/v1/jobs/not-an-id"), 404, "job_id")


def test_unknown_routes_and_methods_are_json_too(client):
    assert_error(client.get("/nope"), 404, None)
    response = client.delete("/v1/jobs")
    assert_error(response, 405, None)
    assert "POST" in response.headers["Allow"]


def test_an_accepted_job_is_202_with_location_and_queued(client, store, redis_client, queue_length):
    before = queue_length()
    response = client.post("/v1/jobs", json={"prompt": "a red bicycle", "seed": 5, "num_images": 2})
    assert response.status_code == 202
    body = response.get_json()
    assert response.headers["Location"] == f"/v1/jobs/{body['id']}"
    assert body["state"] == "QUEUED" and body["request"]["num_images"] == 2
    assert store.get(body["id"]).state is JobState.QUEUED
    assert queue_length() == before + 1
    message = json.loads(redis_client.lindex(f"api-tests{PRIORITY_SEP}{redis_priority(0)}", 0))
    assert message["headers"]["task"] == "fleet.generate"
    assert message["headers"]["argsrepr"] == repr([body["id"]])


def test_probes(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json()["checks"] == {"broker": "ok", "job_store": "ok", "storage": "ok"}


def test_openapi_is_served_and_describes_the_request(client):
    spec = client.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    assert "/v1/jobs" in spec["paths"] and "/v1/jobs/{job_id}" in spec["paths"]
    assert "prompt" in spec["components"]["schemas"]["JobRequest"]["properties"]


def test_broker_down_at_submit_is_a_503_and_leaves_no_job(settings, redis_client):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    client = authed(
        create_app({"SETTINGS": settings.model_copy(update={"broker_url": dead, "publish_timeout_s": 0.5})})
    )
    before = job_count(redis_client)
    response = client.post("/v1/jobs", json={"prompt": "a"})
    assert_error(response, 503, None)
    assert "broker" in response.get_json()["error"]["message"]
    assert response.headers["Retry-After"]
    assert job_count(redis_client) == before


def test_job_store_down_at_submit_is_a_503(settings):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    client = authed(
        create_app({"SETTINGS": settings.model_copy(update={"redis_url": dead, "broker_url": settings.redis_url})})
    )
    response = client.post("/v1/jobs", json={"prompt": "a"})
    assert_error(response, 503, None)
    assert "job store" in response.get_json()["error"]["message"]


def test_readyz_names_the_failing_dependency(settings):
    dead = f"http://127.0.0.1:{free_port()}"
    client = authed(create_app({"SETTINGS": settings.model_copy(update={"s3_endpoint_url": dead})}))
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.get_json()
    assert body["checks"]["storage"] != "ok" and body["checks"]["broker"] == "ok"
    assert "storage" in body["error"]["message"]
