"""The API's own metrics: requests by route (the rule, not the URL) and status, their
latency, jobs accepted by queue and submissions refused by error code; the backlog stays."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app import create_app
from tasks.keys import DEV_KEY


@pytest.fixture
def client(settings):
    app = create_app({"SETTINGS": settings.model_copy(update={"queue": "metrics-tests"}), "TESTING": True})
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {DEV_KEY}"
    return client


def samples(client) -> dict[tuple[str, frozenset], float]:
    text = client.get("/metrics").get_data(as_text=True)
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(found, name: str, **labels) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def test_requests_jobs_accepted_and_refused_are_counted(client):
    job_id = client.post("/v1/jobs", json={"prompt": "counted"}).get_json()["id"]
    for _ in range(3):
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200
    assert client.post("/v1/jobs", json={"prompt": "a", "width": 65}).status_code == 422
    assert client.post("/v1/jobs", data="{", content_type="application/json").status_code == 400
    assert client.get("/nowhere").status_code == 404

    found = samples(client)
    route = "/v1/jobs/<job_id>"
    assert sample(found, "fleet_api_requests_total", route=route, method="GET", status="200") == 3
    assert sample(found, "fleet_api_requests_total", route="/v1/jobs", method="POST", status="202") == 1
    assert sample(found, "fleet_api_requests_total", route="<unmatched>", method="GET", status="404") == 1
    assert sample(found, "fleet_api_request_seconds_count", route=route, method="GET") == 3
    assert sample(found, "fleet_api_jobs_accepted_total", queue="metrics-tests") == 1
    assert sample(found, "fleet_api_jobs_rejected_total", reason="invalid") == 1
    assert sample(found, "fleet_api_jobs_rejected_total", reason="malformed_json") == 1
    assert sample(found, "fleet_api_requests_in_progress") == 1, "the scrape itself"
    assert ("fleet_backlog", frozenset({("queue", "metrics-tests")})) in found


def test_a_replayed_idempotency_key_is_not_a_new_job(client):
    headers = {"Idempotency-Key": "metrics-replay-1"}
    first = client.post("/v1/jobs", json={"prompt": "once"}, headers=headers)
    again = client.post("/v1/jobs", json={"prompt": "once"}, headers=headers)
    assert again.headers.get("Idempotent-Replayed") == "true" and again.get_json()["id"] == first.get_json()["id"]
    assert sample(samples(client), "fleet_api_jobs_accepted_total", queue="metrics-tests") == 1
