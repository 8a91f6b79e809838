"""Canceling jobs through the real API and worker: queued, running alone, running in a
shared batch, after a ``Cancel-After`` deadline, and once finished."""

from __future__ import annotations

import io
from datetime import datetime

import numpy as np
import pytest
import requests
from PIL import Image

from tasks.cancel import CANCELED_BY_CLIENT, NOT_STARTED_IN_TIME
from tests.helpers import download, http, sse, submit, wait_done

pytestmark = pytest.mark.e2e


def cancel(api: str, job_id: str) -> requests.Response:
    return http.post(f"{api}/v1/jobs/{job_id}/cancel", timeout=10)


def cancel_once_running(api: str, job_id: str) -> list[tuple[str, dict]]:
    """Cancel the job at its first progress event; the events it streamed."""
    seen = []
    with http.get(f"{api}/v1/jobs/{job_id}/events", stream=True, timeout=120) as response:
        for name, data in sse(response):
            seen.append((name, data))
            if name == "progress" and sum(n == "progress" for n, _ in seen) == 1:
                assert cancel(api, job_id).status_code == 200
    return seen


def test_a_queued_job_never_runs(idle_api):
    job_id = submit(idle_api, prompt="not wanted")
    response = cancel(idle_api, job_id)
    assert response.status_code == 200
    job = response.json()
    assert job["state"] == "CANCELED" and job["error"] == CANCELED_BY_CLIENT and job["images"] == []
    assert job["started_at"] is None and job["finished_at"]
    assert cancel(idle_api, job_id).status_code == 200  # canceling again changes nothing


def test_a_running_job_alone_stops_at_the_next_step_and_stores_nothing(api_url, storage):
    job_id = submit(api_url, prompt="a long one", steps=100, width=256, height=256)
    events = cancel_once_running(api_url, job_id)
    job = wait_done(api_url, job_id)
    assert job["state"] == "CANCELED" and job["images"] == []
    assert events[-1][0] == "state" and events[-1][1]["state"] == "CANCELED"
    # it stopped early: far fewer than its 100 steps ran
    assert max(data["step"] for name, data in events if name == "progress") < 100
    assert storage.list_keys(f"jobs/{job_id}/") == []


def test_a_job_canceled_in_a_shared_batch_leaves_its_neighbour_whole(api_url, storage):
    shape = {"steps": 30, "width": 64, "height": 64}
    alone = wait_done(api_url, submit(api_url, prompt="neighbour", seed=7, **shape))
    # While a blocker of another shape runs (its time known, so the runner holds the next
    # batch until it is about to end), the two wait for the engine and share a call.
    blocking = {"prompt": "blocker", "steps": 60, "width": 96, "height": 64}
    wait_done(api_url, submit(api_url, **blocking))
    blocker = submit(api_url, **blocking)
    neighbour = submit(api_url, prompt="neighbour", seed=7, **shape)
    leaver = submit(api_url, prompt="leaver", seed=8, **shape)
    events = cancel_once_running(api_url, leaver)
    assert events[-1][1]["state"] == "CANCELED"
    kept = wait_done(api_url, neighbour)
    assert kept["state"] == "SUCCEEDED"
    assert kept["batch"]["images"] == 2  # they did share the call
    # the neighbour's image is the one it makes alone (CPU kernels: within one level)
    (mine,), (theirs,) = (np.asarray(Image.open(io.BytesIO(b))) for b in download(kept)), download(alone)
    assert np.abs(mine.astype(int) - np.asarray(Image.open(io.BytesIO(theirs))).astype(int)).max() <= 1
    assert storage.list_keys(f"jobs/{leaver}/") == []
    assert wait_done(api_url, blocker)["state"] == "SUCCEEDED"


def test_a_finished_job_cannot_be_canceled(api_url):
    job = wait_done(api_url, submit(api_url, prompt="done already", steps=2))
    response = cancel(api_url, job["id"])
    assert response.status_code == 409 and response.json()["error"]["code"] == "conflict"
    assert wait_done(api_url, job["id"])["state"] == "SUCCEEDED"


def test_cancel_after_ends_a_job_that_did_not_start_in_time(idle_api):
    response = http.post(
        f"{idle_api}/v1/jobs", json={"prompt": "in a hurry"}, headers={"Cancel-After": "1s", "Prefer": "wait=20"}
    )
    assert response.status_code == 200
    job = response.json()
    assert job["state"] == "CANCELED" and job["error"] == NOT_STARTED_IN_TIME and job["cancel_at"]


@pytest.mark.parametrize("value", ["soon", "-5", "2d", "1h99x", "1e3", "1.5.2s"])
def test_a_bad_cancel_after_is_refused(idle_api, value):
    response = http.post(f"{idle_api}/v1/jobs", json={"prompt": "x"}, headers={"Cancel-After": value})
    assert response.status_code == 422 and response.json()["error"]["field"] == "Cancel-After"


@pytest.mark.parametrize("value, seconds", [("0s", 1), ("250ms", 1), ("48h", 24 * 3600)])
def test_a_cancel_after_out_of_range_is_moved_to_the_nearest_bound(idle_api, value, seconds):
    """Every duration the header's pattern allows is accepted (the OpenAPI document says
    so); the job's ``cancel_at`` shows the deadline applied."""
    response = http.post(f"{idle_api}/v1/jobs", json={"prompt": "x"}, headers={"Cancel-After": value})
    assert response.status_code == 202
    job = response.json()
    created, cancel_at = (datetime.fromisoformat(job[k].replace("Z", "+00:00")) for k in ("created_at", "cancel_at"))
    assert (cancel_at - created).total_seconds() == pytest.approx(seconds, abs=0.01)
    cancel(idle_api, job["id"])


def test_cancel_of_an_unknown_job_is_404(idle_api):
    assert cancel(idle_api, "f" * 32).status_code == 404
