"""``POST /v1/images/generations``, driven by OpenAI's own Python client: it answers with
the images, its jobs are ordinary jobs that batch with ``/v1/jobs``' ones, and what it
refuses or cannot finish comes back as an error that client reads."""

from __future__ import annotations

import base64
import io
import threading

import openai
import pytest
import requests
from openai import OpenAI
from PIL import Image

from app import create_app
from tasks.keys import DEV_KEY
from tests.helpers import http, submit, wait_done

pytestmark = pytest.mark.e2e


def client_of(api_url: str, api_key: str = DEV_KEY) -> OpenAI:
    return OpenAI(base_url=f"{api_url}/v1", api_key=api_key, max_retries=0, timeout=120)


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def jobs_with_prompt(api_url: str, prompt: str) -> list[dict]:
    listed = http.get(f"{api_url}/v1/jobs", params={"limit": 200}, timeout=10).json()["jobs"]
    return [job for job in listed if job["request"]["prompt"] == prompt]


def test_b64_json_answers_the_images_and_the_jobs_are_ordinary_jobs(api_url):
    result = client_of(api_url).images.generate(
        prompt="an openai kettle",
        n=2,
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 1, "num_inference_steps": 4},
    )
    assert result.created > 0 and len(result.data) == 2
    assert all(png(base64.b64decode(image.b64_json)).size == (64, 64) for image in result.data)
    assert all(image.url is None and image.revised_prompt is None for image in result.data)
    (job,) = jobs_with_prompt(api_url, "an openai kettle")
    assert job["state"] == "SUCCEEDED" and len(job["images"]) == 2
    assert (job["request"]["seed"], job["request"]["steps"], job["request"]["width"]) == (1, 4, 64)


def test_url_answers_presigned_links_that_download(api_url):
    result = client_of(api_url).images.generate(
        prompt="a linked kettle", size="64x128", extra_body={"num_inference_steps": 4}
    )
    (image,) = result.data
    assert image.b64_json is None
    assert png(requests.get(image.url, timeout=10).content).size == (64, 128)


def test_the_same_seed_gives_the_same_bytes(api_url):
    def generate() -> list[bytes]:
        result = client_of(api_url).images.generate(
            prompt="a seeded kettle",
            n=2,
            size="64x64",
            response_format="b64_json",
            extra_body={"seed": 7, "num_inference_steps": 4, "guidance_scale": 3, "negative_prompt": "blur"},
        )
        return [base64.b64decode(image.b64_json) for image in result.data]

    first = generate()
    assert first == generate() and first[0] != first[1]


def test_an_idempotency_key_answers_with_the_same_job(api_url):
    def generate():
        return client_of(api_url).images.with_raw_response.generate(
            prompt="an idempotent kettle",
            size="64x64",
            response_format="b64_json",
            extra_body={"num_inference_steps": 4},  # no seed: a second job would differ
            extra_headers={"Idempotency-Key": "openai-once"},
        )

    first, again = generate(), generate()
    assert "Idempotent-Replayed" not in first.headers and again.headers["Idempotent-Replayed"] == "true"
    assert again.parse().data[0].b64_json == first.parse().data[0].b64_json
    assert len(jobs_with_prompt(api_url, "an idempotent kettle")) == 1


def test_it_batches_with_jobs_from_v1_jobs(api_url):
    """While a long job holds the engine, an OpenAI request and a /v1/jobs job of the same
    shape queue up behind it and share the next model call."""
    shape = {"width": 64, "height": 64, "steps": 4}
    blocking = {"prompt": "a blocker", "steps": 100, "width": 128, "height": 128}
    wait_done(api_url, submit(api_url, **blocking))  # its time known, the runner holds the next batch for it
    blocker = submit(api_url, **blocking)
    answers: list = []
    thread = threading.Thread(
        target=lambda: answers.append(
            client_of(api_url).images.generate(
                prompt="a batched kettle", size="64x64", extra_body={"num_inference_steps": 4}
            )
        )
    )
    thread.start()
    theirs = wait_done(api_url, submit(api_url, prompt="a batched neighbour", **shape))
    thread.join(120)
    (mine,) = jobs_with_prompt(api_url, "a batched kettle")
    assert answers and len(answers[0].data) == 1
    assert mine["batch"]["id"] == theirs["batch"]["id"] and mine["batch"]["images"] == 2
    assert wait_done(api_url, blocker)["state"] == "SUCCEEDED"


def test_a_bad_size_raises_the_clients_422_naming_it(api_url):
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        client_of(api_url).images.generate(prompt="a kettle", size="65x64")
    assert "'size'" in raised.value.message and raised.value.param == "size"
    assert raised.value.type == "invalid_request_error" and raised.value.code == "invalid"
    assert raised.value.body["field"] == "size"  # the fleet's own shape is still there


def test_a_wrong_key_raises_the_clients_authentication_error(api_url):
    with pytest.raises(openai.AuthenticationError) as raised:
        client_of(api_url, api_key="not-a-key").images.generate(prompt="a kettle")
    assert raised.value.param == "Authorization"


def test_a_job_no_worker_starts_in_time_is_a_504_naming_it_that_says_do_not_retry(api_on_idle_queue):
    """No worker consumes this queue: the job is canceled at the bound (its Cancel-After)
    and the client is told so, once."""
    response = api_on_idle_queue(openai_timeout_s=1.0).post(
        "/v1/images/generations", json={"prompt": "never run", "size": "64x64"}
    )
    assert response.status_code == 504, response.get_data(as_text=True)
    assert response.headers["x-should-retry"] == "false"
    error = response.get_json()["error"]
    assert error["code"] == "timeout" and error["type"] == "server_error" and error["param"] is None
    job = api_on_idle_queue().get(response.headers["Location"]).get_json()
    assert job["state"] == "CANCELED" and job["id"] in error["message"]


@pytest.fixture
def api_on_idle_queue(settings):
    """The API in-process, publishing to a queue no worker consumes, with these settings."""

    def make(**changes):
        update = {"queue": "openai-tests", **changes}
        client = create_app({"SETTINGS": settings.model_copy(update=update), "TESTING": True}).test_client()
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {DEV_KEY}"
        return client

    return make


@pytest.fixture
def api(api_on_idle_queue):
    """For requests refused before any job is made."""
    return api_on_idle_queue()


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "a", "size": "big"}, "size"),
        ({"prompt": "a", "size": "1024x1024"}, "size"),  # over the pixel budget
        ({"prompt": "a", "n": 100}, "n"),
        ({"prompt": "a", "num_inference_steps": 10_000}, "num_inference_steps"),
        ({"prompt": "a", "style": "vivid"}, "style"),
        ({"prompt": "a", "quality": "hd"}, "quality"),
        ({"prompt": "a", "response_format": "jpeg"}, "response_format"),
        ({"prompt": "a", "stream": True}, "stream"),
        ({"prompt": "a", "num_images": 2}, "num_images"),  # the job's name for n
        ({"n": 1}, "prompt"),
    ],
)
def test_what_it_cannot_honour_is_refused_naming_the_field(api, body, param):
    response = api.post("/v1/images/generations", json=body)
    assert response.status_code == 422, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["param"] == error["field"] == param and f"'{param}'" in error["message"]


def test_user_and_the_default_quality_are_accepted_and_a_model_must_be_the_fleet_s(api):
    body = {"prompt": "a", "user": "u-1", "quality": "standard", "size": "65x64"}
    response = api.post("/v1/images/generations", json=body)  # gets as far as the size bound
    assert response.status_code == 422 and response.get_json()["error"]["param"] == "size"
    response = api.post("/v1/images/generations", json={**body, "size": "64x64", "model": "dall-e-3"})
    assert response.status_code == 422 and response.get_json()["error"]["param"] == "model"
