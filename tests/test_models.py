"""Many models on one fleet, end to end: a registry of three models, a worker pool for two
of them, jobs routed by ``model`` to the pool that serves it, ``GET /v1/models`` in OpenAI's
shape with each model's state, and what happens to a model no live worker serves."""

from __future__ import annotations

import re

import numpy as np
import pytest
from openai import OpenAI

from fleet.processes import free_port
from fleet.stack import start_api, start_worker
from tasks.keys import DEV_KEY
from tests.helpers import download, http, submit, wait_done
from workers.lora import WEIGHTS_NAME, random_adapter

pytestmark = pytest.mark.e2e

QUEUES = {"FLEET_QUEUE": "fleet.multi", "FLEET_BATCH_QUEUE": "fleet.multi-batch", "FLEET_QUEUE_POLICIES": "{}"}


@pytest.fixture(scope="module")
def fleet(fleet_env, work_dir, tiny_model):
    """A registry of the tiny model (the default), its int8 pool and a model no worker
    serves; one worker per served model; an API that queues for an unserved model and one
    that refuses."""
    registry = work_dir / "models.toml"
    broken = work_dir / "loras" / "broken" / WEIGHTS_NAME
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not an adapter")
    noise = random_adapter(tiny_model, work_dir / "loras" / "noise", seed=3).parent
    registry.write_text(
        f'[models.tiny]\npath = "{tiny_model}"\nloras = {{ noise = "{noise}", broken = "{broken.parent}" }}\n\n'
        f'[models.tiny-int8]\npath = "{tiny_model}"\nquantize = "int8"\n\n'
        f'[models.tiny-unserved]\npath = "{tiny_model}"\nmax_steps = 10\n'
    )
    env = {**fleet_env, **QUEUES, "FLEET_MODELS_FILE": str(registry), "FLEET_MAX_WAIT_MS": "0"}
    servers = [
        start_worker(env, work_dir, "models-tiny"),
        start_worker({**env, "FLEET_SERVE": "tiny-int8"}, work_dir, "models-int8"),
    ]
    queueing, queueing_url = start_api({**env, "FLEET_API_PORT": str(free_port())}, work_dir, name="models-api")
    refusing, refusing_url = start_api(
        {**env, "FLEET_API_PORT": str(free_port()), "FLEET_UNSERVED_MODEL": "reject"},
        work_dir,
        name="models-api-reject",
    )
    yield queueing_url, refusing_url, env
    for server in (*servers, queueing, refusing):
        server.stop()


def test_each_job_runs_on_the_pool_of_the_model_it_names(fleet):
    api, *_ = fleet
    jobs = {model: submit(api, prompt="a fox", steps=2, seed=7, model=model) for model in ("tiny", "tiny-int8")}
    done = {model: wait_done(api, job_id) for model, job_id in jobs.items()}
    for model, job in done.items():
        assert job["state"] == "SUCCEEDED", job["error"]
        assert job["request"]["model"] == model
    assert done["tiny"]["queue"] == "fleet.multi" and done["tiny"]["worker"].startswith("models-tiny@")
    assert done["tiny-int8"]["queue"] == "fleet.multi.tiny-int8" and done["tiny-int8"]["worker"].startswith(
        "models-int8@"
    )
    plain, int8 = (np.frombuffer(download(done[m])[0], dtype=np.uint8) for m in ("tiny", "tiny-int8"))
    assert not np.array_equal(plain, int8)  # the same seed, another pool's weights
    default = wait_done(api, submit(api, prompt="a fox", steps=2, seed=7))
    assert default["request"]["model"] == "tiny" and default["queue"] == "fleet.multi"


def test_a_lora_adapter_changes_the_image_and_one_that_fails_to_load_fails_only_its_jobs(fleet):
    """The same seed with the noise adapter draws another image; the broken adapter's job
    fails saying why, and the worker goes on to run the next job as before."""
    api, *_ = fleet
    base, noise, broken = (
        submit(api, prompt="a fox", steps=2, seed=11, **extra)
        for extra in ({}, {"loras": [{"name": "noise", "scale": 0.8}]}, {"loras": [{"name": "broken"}]})
    )
    base, noise, broken = (wait_done(api, job_id) for job_id in (base, noise, broken))
    assert base["state"] == noise["state"] == "SUCCEEDED"
    assert noise["request"]["loras"] == [{"name": "noise", "scale": 0.8}]
    assert download(base)[0] != download(noise)[0]
    assert broken["state"] == "FAILED" and "LoRA adapter 'broken' could not be loaded" in broken["error"]
    again = wait_done(api, submit(api, prompt="a fox", steps=2, seed=11))
    assert again["state"] == "SUCCEEDED" and download(again)[0] == download(base)[0]
    assert http.get(f"{api}/v1/models/tiny", timeout=10).json()["loras"] == ["broken", "noise"]


def test_the_models_are_listed_in_openai_s_shape_with_their_state(fleet):
    api, *_ = fleet
    listed = http.get(f"{api}/v1/models", timeout=10).json()
    assert listed["object"] == "list"
    models = {m["id"]: m for m in listed["data"]}
    assert list(models) == ["tiny", "tiny-int8", "tiny-unserved"]
    assert models["tiny"]["default"] and not models["tiny-int8"]["default"]
    assert models["tiny-int8"]["quantize"] == "int8" and models["tiny-unserved"]["max_steps"] == 10
    assert [m["state"]["workers"] for m in models.values()] == [1, 1, 0]
    assert [q["name"] for q in models["tiny-int8"]["state"]["queues"]] == [
        "fleet.multi.tiny-int8",
        "fleet.multi-batch.tiny-int8",
    ]
    client = OpenAI(base_url=f"{api}/v1", api_key=DEV_KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny", "tiny-int8", "tiny-unserved"]
    assert client.models.retrieve("tiny-int8").owned_by == "diffusion-fleet"
    missing = http.get(f"{api}/v1/models/nope", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "name"


def test_an_unknown_model_or_steps_outside_a_model_s_range_are_refused_naming_the_field(fleet):
    api, *_ = fleet
    for body, field in (({"model": "dall-e-3"}, "model"), ({"model": "tiny-unserved", "steps": 11}, "steps")):
        refused = http.post(f"{api}/v1/jobs", json={"prompt": "x", **body}, timeout=10)
        assert refused.status_code == 422 and refused.json()["error"]["field"] == field, refused.text
    openai = http.post(f"{api}/v1/images/generations", json={"prompt": "x", "model": "dall-e-3"}, timeout=10)
    assert openai.status_code == 422 and openai.json()["error"]["param"] == "model"


def test_the_openai_route_runs_the_model_it_names(fleet):
    api, *_ = fleet
    client = OpenAI(base_url=f"{api}/v1", api_key=DEV_KEY, max_retries=0, timeout=120)
    result = client.images.generate(prompt="a fox", model="tiny-int8", extra_body={"num_inference_steps": 2})
    assert result.data[0].url


def test_a_model_no_live_worker_serves_is_queued_or_refused_as_configured(fleet):
    queueing, refusing, _ = fleet
    before = [job["id"] for job in http.get(f"{refusing}/v1/jobs", timeout=10).json()["jobs"]]
    refused = http.post(f"{refusing}/v1/jobs", json={"prompt": "x", "model": "tiny-unserved"}, timeout=10)
    assert refused.status_code == 503 and refused.headers["Retry-After"]
    assert refused.json()["error"]["field"] == "model" and refused.json()["error"]["code"] == "model_unserved"
    after = [job["id"] for job in http.get(f"{refusing}/v1/jobs", timeout=10).json()["jobs"]]
    assert after == before  # nothing was made
    waiting = http.post(f"{queueing}/v1/jobs", json={"prompt": "x", "model": "tiny-unserved"}, timeout=10)
    assert waiting.status_code == 202 and waiting.json()["queue"] == "fleet.multi.tiny-unserved"
    assert waiting.json()["place_in_line"]["position"] == 0
    backlog = http.get(f"{queueing}/metrics/backlog", timeout=10).json()
    assert backlog["models"]["tiny-unserved"] == {
        "queued": 1,
        "running": 0,
        "backlog": 1,
    }  # its pool's scaler reads this
    assert backlog["models"]["tiny-int8"]["queued"] == 0
    assert http.post(f"{queueing}/v1/jobs/{waiting.json()['id']}/cancel", timeout=10).status_code == 200


def test_the_playground_offers_the_model_s_adapters_and_submits_the_chosen_ones(fleet):
    """In Chromium: the tiny model's adapters are listed with a scale each; the one ticked
    is in the job the page submits, with its scale, and the image arrives."""
    from selenium.webdriver.common.by import By

    from fleet.processes import wait_for
    from tests.browser import chromium, text

    api, *_ = fleet
    browser = chromium()
    try:
        browser.get(f"{api}/playground")
        browser.find_element(By.ID, "key").send_keys(DEV_KEY)
        browser.find_element(By.ID, "prompt").click()
        wait_for(lambda: browser.find_elements(By.ID, "lora-noise"), 30, "the adapters listed")
        assert {box.get_attribute("value") for box in browser.find_elements(By.NAME, "lora")} == {"broken", "noise"}
        browser.find_element(By.ID, "prompt").clear()
        browser.find_element(By.ID, "prompt").send_keys("a fox")
        steps = browser.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys("2")
        browser.find_element(By.ID, "lora-noise").click()
        scale = browser.find_element(By.ID, "lora-noise-scale")
        scale.clear()
        scale.send_keys("0.5")
        browser.find_element(By.ID, "submit").click()
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#images img"), 60, "the image shown")
        job_id = re.search(r"Job ([0-9a-f]{32})", text(browser.find_element(By.ID, "state"))).group(1)
    finally:
        browser.quit()
    job = wait_done(api, job_id)
    assert job["state"] == "SUCCEEDED" and job["request"]["loras"] == [{"name": "noise", "scale": 0.5}]


def test_a_job_for_a_pool_scaled_to_zero_runs_once_its_first_worker_starts(fleet, work_dir):
    """Scale from zero: the job is accepted while no worker serves its model, waits in its
    queue, and is done by the pool's first worker, started after it (its cold start plus
    one batch: fleet bench models measures that time)."""
    api, _, env = fleet
    job_id = submit(api, prompt="a fox", steps=2, seed=5, model="tiny-unserved")
    assert http.get(f"{api}/v1/jobs/{job_id}", timeout=10).json()["state"] == "QUEUED"
    worker = start_worker({**env, "FLEET_SERVE": "tiny-unserved"}, work_dir, "models-from-zero")
    try:
        job = wait_done(api, job_id)
    finally:
        worker.stop()
    assert job["state"] == "SUCCEEDED" and job["worker"].startswith("models-from-zero@")
