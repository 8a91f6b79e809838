"""Request validation names the offending field; the state machine only moves forward."""

from __future__ import annotations

import pytest

from tasks.errors import ValidationFailed
from tasks.jobs import TERMINAL_STATES, Job, JobState, can_move, new_job_id, parse_request
from tasks.settings import Settings

SETTINGS = Settings(max_pixels=256 * 256, max_steps=50, max_images_per_job=4, max_prompt_chars=100)


def field_of(body) -> str | None:
    with pytest.raises(ValidationFailed) as info:
        parse_request(body, SETTINGS)
    return info.value.field


def test_defaults_fill_a_minimal_request():
    spec = parse_request({"prompt": "a cat", "seed": 3}, SETTINGS)
    assert (spec.width, spec.height, spec.steps, spec.num_images, spec.seed) == (64, 64, 20, 1, 3)
    assert spec.guidance_scale == 7.5


def test_a_missing_seed_is_drawn():
    assert parse_request({"prompt": "a"}, SETTINGS).seed >= 0


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"prompt": "x" * 101}, "prompt"),
        ({"prompt": "a", "negative_prompt": "x" * 101}, "negative_prompt"),
        ({"prompt": "a", "width": 65}, "width"),
        ({"prompt": "a", "height": 0}, "height"),
        ({"prompt": "a", "width": "64"}, "width"),
        ({"prompt": "a", "width": 64.5}, "width"),  # 64.0 is 64: JSON Schema calls it an integer
        ({"prompt": "a", "width": 512, "height": 512}, "width"),
        ({"prompt": "a", "height": 2048}, "height"),
        ({"prompt": "a", "steps": 0}, "steps"),
        ({"prompt": "a", "steps": 51}, "steps"),
        ({"prompt": "a", "steps": True}, "steps"),
        ({"prompt": "a", "num_images": 0}, "num_images"),
        ({"prompt": "a", "num_images": 5}, "num_images"),
        ({"prompt": "a", "guidance_scale": "high"}, "guidance_scale"),
        ({"prompt": "a", "guidance_scale": -1}, "guidance_scale"),
        ({"prompt": "a", "seed": -1}, "seed"),
        ({"prompt": "a", "seed": 2**64}, "seed"),
        ({"prompt": "a", "colour": "red"}, "colour"),
    ],
)
def test_invalid_requests_name_the_field(body, field):
    assert field_of(body) == field


@pytest.mark.parametrize("body", [None, [], "prompt", 3])
def test_a_body_that_is_not_an_object_is_rejected(body):
    assert field_of(body) is None


def test_terminal_states_never_move():
    for state in TERMINAL_STATES:
        assert not any(can_move(state, target) for target in JobState)


def test_the_happy_path_and_redelivery_are_allowed():
    assert can_move(JobState.QUEUED, JobState.RUNNING)
    assert can_move(JobState.RUNNING, JobState.RUNNING)
    assert can_move(JobState.RUNNING, JobState.SUCCEEDED)
    assert not can_move(JobState.RUNNING, JobState.QUEUED)
    assert not can_move(JobState.QUEUED, JobState.SUCCEEDED)


def test_image_seeds_differ_per_image_and_depend_only_on_job_seed_and_index():
    spec = parse_request({"prompt": "a", "seed": 10, "num_images": 3}, SETTINGS)
    assert [spec.image_seed(i) for i in range(3)] == [10, 11, 12]


def test_job_ids_are_128_random_bits():
    ids = {new_job_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 32 for i in ids)


def test_a_record_round_trips_through_its_redis_form():
    spec = parse_request({"prompt": "a", "seed": 1}, SETTINGS)
    job = Job(id=new_job_id(), state=JobState.QUEUED, spec=spec, created_at=1.5, error="x", worker="w")
    again = Job.from_redis(job.to_redis())
    assert again == job
