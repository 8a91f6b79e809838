"""Waiting for a job without polling, through the real API, worker, Redis and S3:
``Prefer: wait``, the event stream, progress and the place in line."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest
import requests

from tests.helpers import http, sse, submit

pytestmark = pytest.mark.e2e


def test_prefer_wait_answers_200_with_the_finished_job(api_url):
    response = http.post(
        f"{api_url}/v1/jobs", json={"prompt": "a kettle", "steps": 4}, headers={"Prefer": "wait=60"}, timeout=70
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["state"] == "SUCCEEDED" and len(job["images"]) == 1
    assert response.headers["Preference-Applied"] == "wait=60"
    assert response.headers["Location"].endswith(job["id"])


def test_prefer_wait_that_runs_out_answers_202_with_a_location(idle_api):
    response = http.post(f"{idle_api}/v1/jobs", json={"prompt": "never run"}, headers={"Prefer": "wait=1"})
    assert response.status_code == 202
    assert response.json()["state"] == "QUEUED"
    assert response.headers["Preference-Applied"] == "wait=1"
    assert response.headers["Location"].endswith(response.json()["id"])
    http.post(f"{idle_api}/v1/jobs/{response.json()['id']}/cancel", timeout=10)


def test_a_wait_over_the_limit_is_capped_and_a_bad_one_is_refused(idle_api):
    job_id = submit(idle_api, prompt="capped")
    http.post(f"{idle_api}/v1/jobs/{job_id}/cancel", timeout=10)
    response = http.get(f"{idle_api}/v1/jobs/{job_id}", headers={"Prefer": "wait=3600"}, timeout=10)
    assert response.status_code == 200 and response.headers["Preference-Applied"] == "wait=60"
    response = http.get(f"{idle_api}/v1/jobs/{job_id}", headers={"Prefer": "wait=soon"}, timeout=10)
    assert response.status_code == 422 and response.json()["error"]["field"] == "Prefer"


def test_the_event_stream_shows_every_state_and_each_step_then_ends(api_url):
    job_id = submit(api_url, prompt="a stream", steps=8)
    with http.get(f"{api_url}/v1/jobs/{job_id}/events", stream=True, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = list(sse(response))  # returns: the server ends the stream with the job
    states = [data["state"] for name, data in events if name == "state"]
    steps = [data["step"] for name, data in events if name == "progress"]
    assert states[-1] == "SUCCEEDED" and "RUNNING" in states
    assert steps == sorted(steps) and steps[-1] == 8
    assert all(data["total"] == 8 for name, data in events if name == "progress")
    assert events[-1][1]["images"] and events[-1][1]["progress"] == {"step": 8, "total": 8}


def test_an_unknown_job_has_no_stream(api_url):
    response = http.get(f"{api_url}/v1/jobs/{'0' * 32}/events", timeout=10)
    assert response.status_code == 404 and response.json()["error"]["field"] == "job_id"


def test_queued_jobs_show_their_place_in_line(idle_api):
    ids = [submit(idle_api, prompt=f"in line {i}") for i in range(3)]
    try:
        places = [http.get(f"{idle_api}/v1/jobs/{i}", timeout=10).json()["place_in_line"] for i in ids]
        positions = [place["position"] for place in places]
        assert positions == sorted(positions) and positions[1] == positions[0] + 1 == positions[2] - 1
        # nothing finished on this queue lately: no rate to estimate a start from
        assert all(place["estimated_start_at"] is None for place in places)
    finally:
        for job_id in ids:
            http.post(f"{idle_api}/v1/jobs/{job_id}/cancel", timeout=10)
    assert http.get(f"{idle_api}/v1/jobs/{ids[0]}", timeout=10).json()["place_in_line"] is None


def test_a_job_a_free_worker_thread_waits_for_starts_now(idle_api, store):
    """With a worker announced on its queue and threads free, the next job's estimated start
    is now; once the worker withdraws, nothing can take it and there is no estimate."""
    job_id = submit(idle_api, prompt="next in line")
    queue = store.get(job_id).queue
    try:
        store.announce("idle-worker@test", [queue], threads=1000, ttl_s=60)
        place = http.get(f"{idle_api}/v1/jobs/{job_id}", timeout=10).json()["place_in_line"]
        started = datetime.fromisoformat(place["estimated_start_at"].replace("Z", "+00:00")).timestamp()
        assert abs(started - time.time()) < 5, place
        store.withdraw("idle-worker@test", [queue])
        assert (
            http.get(f"{idle_api}/v1/jobs/{job_id}", timeout=10).json()["place_in_line"]["estimated_start_at"] is None
        )
    finally:
        store.withdraw("idle-worker@test", [queue])
        http.post(f"{idle_api}/v1/jobs/{job_id}/cancel", timeout=10)


def test_a_hundred_waiting_clients_do_not_starve_the_api(idle_api):
    """100 requests held by ``Prefer: wait`` on one API process (gevent): a status read
    still answers while they wait, and each waiter wakes on its job's event."""
    ids = [submit(idle_api, prompt=f"waiter {i}") for i in range(100)]
    holding = threading.Barrier(101, timeout=30)

    def wait(job_id: str) -> requests.Response:
        holding.wait()
        return http.get(f"{idle_api}/v1/jobs/{job_id}", headers={"Prefer": "wait=60"}, timeout=90)

    with ThreadPoolExecutor(100) as pool:
        waiting = [pool.submit(wait, job_id) for job_id in ids]
        holding.wait()
        # all 100 are held now; the API still answers, and none of them has returned
        assert requests.get(f"{idle_api}/healthz", timeout=10).status_code == 200
        assert http.get(f"{idle_api}/v1/jobs/{ids[0]}", timeout=10).json()["state"] == "QUEUED"
        assert not any(w.done() for w in waiting)
        for job_id in ids:
            assert http.post(f"{idle_api}/v1/jobs/{job_id}/cancel", timeout=10).status_code == 200
        answers = [w.result() for w in waiting]
    assert all(a.status_code == 200 and a.json()["state"] == "CANCELED" for a in answers)


def test_the_backlog_counts_queued_and_running_jobs_per_queue(idle_api):
    """What an autoscaler reads: the idle queue's QUEUED jobs, in JSON and for Prometheus."""
    before = requests.get(f"{idle_api}/metrics/backlog", timeout=10).json()["queues"]["fleet.idle"]
    ids = [submit(idle_api, prompt=f"backlog {i}") for i in range(2)]
    try:
        after = requests.get(f"{idle_api}/metrics/backlog", timeout=10).json()["queues"]["fleet.idle"]
        assert after["queued"] == before["queued"] + 2 and after["backlog"] == after["queued"] + after["running"]
        text = requests.get(f"{idle_api}/metrics", timeout=10).text
        assert f'fleet_backlog{{queue="fleet.idle"}} {float(after["backlog"])}' in text
    finally:
        for job_id in ids:
            http.post(f"{idle_api}/v1/jobs/{job_id}/cancel", timeout=10)
    assert requests.get(f"{idle_api}/metrics/backlog", timeout=10).json()["queues"]["fleet.idle"] == before


def test_the_stream_of_a_queued_job_pushes_its_place_when_a_job_ahead_leaves(idle_api):
    """A queued job's stream sends a state event with its new position when a job ahead is canceled."""
    ahead, waiting = submit(idle_api, prompt="ahead"), submit(idle_api, prompt="behind")
    with http.get(f"{idle_api}/v1/jobs/{waiting}/events", stream=True, timeout=30) as response:
        events = sse(response)
        name, first = next(events)
        assert name == "state" and first["state"] == "QUEUED"
        http.post(f"{idle_api}/v1/jobs/{ahead}/cancel", timeout=10)
        name, moved = next(events)  # within PLACE_RECHECK_S of the cancel, which moved the hub's count
        assert name == "state" and moved["state"] == "QUEUED"
        assert moved["place_in_line"]["position"] == first["place_in_line"]["position"] - 1
        http.post(f"{idle_api}/v1/jobs/{waiting}/cancel", timeout=10)
        assert [data["state"] for _, data in events] == ["CANCELED"]


def events_with_ids(api_url: str, job_id: str, last_event_id: str | None = None) -> list[tuple[str, str, str]]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with http.get(f"{api_url}/v1/jobs/{job_id}/events", headers=headers, stream=True, timeout=30) as response:
        assert response.status_code == 200
        blocks = response.text.split("\n\n")
    fields = [dict(line.split(": ", 1) for line in block.splitlines() if ": " in line) for block in blocks]
    return [(f["event"], f.get("id", ""), f["data"]) for f in fields if "event" in f]


def test_each_event_has_an_id_and_a_reconnect_never_sees_the_end_twice(idle_api):
    """Events carry `STATE.step` ids; Last-Event-ID gets the current state first, or nothing after the end."""
    job_id = submit(idle_api, prompt="resumed")
    http.post(f"{idle_api}/v1/jobs/{job_id}/cancel", timeout=10)
    assert [(name, event_id) for name, event_id, _ in events_with_ids(idle_api, job_id)] == [("state", "CANCELED.0")]
    resumed = events_with_ids(idle_api, job_id, last_event_id="QUEUED.0")  # it dropped while queued
    assert [(name, event_id) for name, event_id, _ in resumed] == [("state", "CANCELED.0")]
    assert events_with_ids(idle_api, job_id, last_event_id="CANCELED.0") == []  # it saw the end
    assert [name for name, _, _ in events_with_ids(idle_api, job_id, last_event_id="garbage")] == ["state"]
