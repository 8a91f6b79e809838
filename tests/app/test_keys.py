"""API keys, ownership, limits, listing and idempotency, through a real API on a queue
no worker consumes (its jobs stay QUEUED until canceled)."""

from __future__ import annotations

import pytest
import requests

from fleet.processes import free_port
from fleet.stack import start_api
from tasks.keys import DEV_KEYS, hash_key
from tests.conftest import IDLE_QUEUES

pytestmark = pytest.mark.e2e

KEYS = {"alice": "alice-key", "bob": "bob-key", "carol": "carol-key", "dave": "dave-key"}


@pytest.fixture(scope="module")
def keyed_api(fleet_env, work_dir) -> str:
    entries = ",".join([DEV_KEYS] + [f"{name}:{hash_key(key)}" for name, key in KEYS.items()])
    env = {
        **fleet_env,
        **IDLE_QUEUES,
        "FLEET_API_PORT": str(free_port()),
        "FLEET_API_KEYS": entries,
        "FLEET_RATE_LIMIT_PER_MINUTE": "5",
        "FLEET_MAX_ACTIVE_JOBS_PER_KEY": "3",
    }
    server, url = start_api(env, work_dir, name="keyed-api")
    yield url
    server.stop()


def as_(name: str) -> requests.Session:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {KEYS[name]}"
    return session


def submit(session: requests.Session, api: str, **body) -> requests.Response:
    return session.post(f"{api}/v1/jobs", json={"prompt": "x", **body}, timeout=10)


def test_no_key_or_an_unknown_key_is_401(keyed_api):
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}):
        response = requests.post(f"{keyed_api}/v1/jobs", json={"prompt": "x"}, headers=headers, timeout=10)
        assert response.status_code == 401 and response.json()["error"]["field"] == "Authorization"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_a_job_is_its_keys_alone(keyed_api):
    alice, bob = as_("alice"), as_("bob")
    job_id = submit(alice, keyed_api).json()["id"]
    try:
        assert bob.get(f"{keyed_api}/v1/jobs/{job_id}", timeout=10).status_code == 404
        assert bob.post(f"{keyed_api}/v1/jobs/{job_id}/cancel", timeout=10).status_code == 404
        assert bob.get(f"{keyed_api}/v1/jobs/{job_id}/events", timeout=10).status_code == 404
        assert job_id not in [j["id"] for j in bob.get(f"{keyed_api}/v1/jobs", timeout=10).json()["jobs"]]
    finally:
        alice.post(f"{keyed_api}/v1/jobs/{job_id}/cancel", timeout=10)


def test_listing_is_newest_first_with_a_state_filter_and_a_cursor(keyed_api):
    alice = as_("alice")
    ids = [submit(alice, keyed_api, seed=i).json()["id"] for i in range(3)]
    for job_id in ids:
        alice.post(f"{keyed_api}/v1/jobs/{job_id}/cancel", timeout=10)
    first = alice.get(f"{keyed_api}/v1/jobs", params={"limit": 2}, timeout=10)
    page = first.json()
    assert [j["id"] for j in page["jobs"]] == ids[::-1][:2] and 'rel="next"' in first.headers["Link"]
    rest = alice.get(f"{keyed_api}/v1/jobs", params={"limit": 2, "cursor": page["next_cursor"]}, timeout=10).json()
    assert rest["jobs"][0]["id"] == ids[0]
    canceled = alice.get(f"{keyed_api}/v1/jobs", params={"state": "CANCELED"}, timeout=10).json()["jobs"]
    assert {j["id"] for j in canceled} >= set(ids) and all(j["state"] == "CANCELED" for j in canceled)
    for params, field in (({"state": "DONE"}, "state"), ({"limit": "0"}, "limit"), ({"cursor": "x"}, "cursor")):
        response = alice.get(f"{keyed_api}/v1/jobs", params=params, timeout=10)
        assert response.status_code == 422 and response.json()["error"]["field"] == field


def test_a_key_has_a_cap_on_active_jobs(keyed_api):
    carol = as_("carol")
    ids = [submit(carol, keyed_api).json()["id"] for _ in range(3)]
    refused = submit(carol, keyed_api)
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    carol.post(f"{keyed_api}/v1/jobs/{ids[0]}/cancel", timeout=10)  # one ends: room for one more
    accepted = submit(carol, keyed_api)
    assert accepted.status_code == 202
    for job_id in ids[1:] + [accepted.json()["id"]]:
        carol.post(f"{keyed_api}/v1/jobs/{job_id}/cancel", timeout=10)


def test_a_key_has_a_rate_limit(keyed_api):
    bob = as_("bob")
    answers = []
    for _ in range(11):  # 5 a minute: a 429 comes within two windows whatever the clock
        response = submit(bob, keyed_api)
        answers.append(response.status_code)
        if response.status_code == 202:
            bob.post(f"{keyed_api}/v1/jobs/{response.json()['id']}/cancel", timeout=10)
        else:
            assert response.status_code == 429 and response.json()["error"]["code"] == "rate_limited"
            assert 1 <= int(response.headers["Retry-After"]) <= 61
            break
    assert answers[-1] == 429 and answers.count(202) >= 5


def test_the_same_idempotency_key_and_body_give_the_same_job(keyed_api):
    alice = as_("alice")
    key = {"Idempotency-Key": f"order-{free_port()}"}
    first = alice.post(f"{keyed_api}/v1/jobs", json={"prompt": "once", "seed": 1}, headers=key, timeout=10)
    again = alice.post(f"{keyed_api}/v1/jobs", json={"seed": 1, "prompt": "once"}, headers=key, timeout=10)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    other = alice.post(f"{keyed_api}/v1/jobs", json={"prompt": "twice"}, headers=key, timeout=10)
    assert other.status_code == 422 and other.json()["error"]["field"] == "Idempotency-Key"
    # another key's use of the same Idempotency-Key is its own
    daves = as_("dave").post(f"{keyed_api}/v1/jobs", json={"prompt": "once", "seed": 1}, headers=key, timeout=10)
    assert daves.json()["id"] != first.json()["id"]
    alice.post(f"{keyed_api}/v1/jobs/{first.json()['id']}/cancel", timeout=10)
    as_("dave").post(f"{keyed_api}/v1/jobs/{daves.json()['id']}/cancel", timeout=10)


def test_the_webhook_secret_is_per_key(keyed_api):
    alice = as_("alice").get(f"{keyed_api}/v1/webhooks/secret", timeout=10).json()
    bob = as_("bob").get(f"{keyed_api}/v1/webhooks/secret", timeout=10).json()
    assert alice["key"] == "alice" and alice["secret"].startswith("whsec_") and alice["secret"] != bob["secret"]
