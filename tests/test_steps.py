"""Step-level batching end to end (``FLEET_BATCHING=step``): through the API, the broker, a
real worker and the real tiny pipeline, a short job sent while a long one denoises joins
it at a step boundary and is done first, and it gets the image the request-level fleet
gives the same request."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from fleet.processes import free_port
from fleet.stack import start_api, start_worker
from tests.helpers import download, http, submit, wait_done

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stepping(fleet_env, work_dir):
    env = {
        **fleet_env,
        "FLEET_QUEUE": "fleet.steps",
        "FLEET_BATCH_QUEUE": "fleet.steps-batch",
        "FLEET_QUEUE_POLICIES": "{}",
        "FLEET_BATCHING": "step",
        "FLEET_API_PORT": str(free_port()),
    }
    worker = start_worker(env, work_dir, "steps-worker")
    api, url = start_api(env, work_dir, name="steps-api")
    yield url
    for server in (worker, api):
        server.stop()


def pixels(job: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(download(job)[0])).convert("RGB"), dtype=np.int16)


def test_a_short_job_joins_a_long_one_at_a_step_boundary_and_gets_the_request_level_image(stepping, api_url):
    request = {"prompt": "a lighthouse", "width": 64, "height": 64, "seed": 5}
    long = submit(stepping, **request, steps=100)
    deadline = time.monotonic() + 60
    while http.get(f"{stepping}/v1/jobs/{long}", timeout=10).json().get("progress") is None:
        assert time.monotonic() < deadline, "the long job never started"
        time.sleep(0.02)
    short = submit(stepping, **{**request, "seed": 6}, steps=4)
    short_job, long_job = wait_done(stepping, short), wait_done(stepping, long)
    assert short_job["state"] == long_job["state"] == "SUCCEEDED"
    assert short_job["finished_at"] < long_job["finished_at"], "it did not wait for the long job's call"
    assert short_job["batch"]["id"] != long_job["batch"]["id"]
    assert short_job["batch"]["images"] == 2, "each of its steps was a call of 2 images, its own and the long job's"
    alone = wait_done(api_url, submit(api_url, **{**request, "seed": 6}, steps=4))
    assert int(np.abs(pixels(short_job) - pixels(alone)).max()) <= 1, "the request-level image, within a level"
