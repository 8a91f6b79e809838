"""The request model carries every bound: each refusal names its field, the prompt rules
are its pattern, JSON's integers are integers, and a webhook's URL is what the fleet can
check at submit time."""

from __future__ import annotations

import pytest

from tasks.destinations import url_pattern
from tasks.errors import ValidationFailed
from tasks.jobs import to_spec
from tasks.request import SCHEDULERS, RequestBounds, request_model, validate_request
from tasks.settings import Settings
from tasks.webhooks import check_webhook_url

SETTINGS = Settings()


def refused(body: dict, settings: Settings = SETTINGS) -> ValidationFailed:
    with pytest.raises(ValidationFailed) as info:
        validate_request(body, settings)
    return info.value


@pytest.mark.parametrize(
    "char", [chr(c) for c in [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F, 0x85, 0x9F]]
)
def test_control_characters_are_refused_in_prompts(char):
    for field in ("prompt", "negative_prompt"):
        error = refused({"prompt": "a", field: f"a{char}b"})
        assert error.field == field and "control characters" in error.message


def test_tabs_and_line_breaks_are_text():
    request = validate_request({"prompt": "a\tb\r\nc", "negative_prompt": "\n"}, SETTINGS)
    assert request.prompt == "a\tb\r\nc"


@pytest.mark.parametrize("prompt", ["", " ", "\u3000", "\u200b", "\ufeff\t\u2028"])
def test_a_blank_prompt_is_refused_by_the_pattern(prompt):
    assert refused({"prompt": prompt}).field == "prompt"


def test_a_lone_surrogate_is_refused_not_stored():
    """JSON can carry "\\ud800"; it cannot be encoded to store the job (it was a 500)."""
    assert refused({"prompt": "a\ud800"}).field == "prompt"


def test_an_integer_written_with_a_point_is_an_integer():
    """JSON Schema calls 64.0 an integer, so the API takes it; a fraction, a string or a
    boolean is still refused."""
    assert validate_request({"prompt": "a", "width": 64.0, "seed": 3.0}, SETTINGS).width == 64
    for width in (64.5, "64", True):
        assert refused({"prompt": "a", "width": width}).field == "width"


def test_messages_say_what_a_valid_value_is():
    assert refused({"prompt": "a", "steps": 0}).message == "'steps' must be an integer from 1 to 100"
    assert refused({"prompt": "a", "width": 520}).message == "'width' must be a multiple of 8 from 8 to 512"
    assert refused({"prompt": "a", "colour": "red"}).message == "unknown field 'colour'"


def test_webhook_events_need_a_webhook():
    assert refused({"prompt": "a", "webhook_events": []}).field == "webhook_events"
    assert validate_request({"prompt": "a", "webhook_events": None}, SETTINGS).webhook is None


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/in?x=1#y",
        "HTTP://a.b:65535",
        "http://xn--bcher-kva.example./",
        f"https://{'a' * 63}.example/",
    ],
)
def test_a_webhook_with_a_host_name_passes_every_submit_check(url):
    request = validate_request({"prompt": "a", "webhook": url}, SETTINGS)
    check_webhook_url(request.webhook, SETTINGS)


def test_literal_addresses_only_where_private_ones_are_allowed():
    """A pattern cannot tell public addresses from forbidden ones, so without
    FLEET_WEBHOOK_ALLOW_PRIVATE a literal address is refused outright."""
    relaxed = Settings(webhook_allow_private=True)
    for url in ("http://127.0.0.1:9000/hook", "http://[::ffff:10.0.0.1]/", "http://[fd00:ec2::254]/"):
        assert refused({"prompt": "a", "webhook": url}).field == "webhook"
        check_webhook_url(validate_request({"prompt": "a", "webhook": url}, relaxed).webhook, relaxed)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://a.example/",
        "https://a_b.example/",
        "https://user:pw@a.example/",
        "https://a.example:65536/",
        "http://[x]/",
    ],
)
def test_urls_the_fleet_cannot_send_to_are_refused_at_submit(url):
    assert refused({"prompt": "a", "webhook": url}, Settings(webhook_allow_private=True)).field == "webhook"


def test_parse_url_refuses_a_broken_bracketed_host_instead_of_crashing():
    with pytest.raises(ValidationFailed, match="invalid host"):
        check_webhook_url("http://[::1/", SETTINGS)
    assert url_pattern(allow_private=True) != url_pattern(allow_private=False)


def test_the_pixel_budget_holds_beside_defaults():
    wide = Settings(max_side=1024, max_pixels=256 * 256, default_width=64, default_height=512)
    assert validate_request({"prompt": "a", "width": 1024, "height": 64}, wide).width == 1024
    assert refused({"prompt": "a", "width": 1024}, wide).message.startswith("width x height = 524288")
    rules = request_model(RequestBounds.of(wide)).model_json_schema()["allOf"]
    # widths 912..1024 leave room for 64 rows, fewer than the default height: say so
    width = {"type": "integer", "minimum": 912, "maximum": 1024}
    height = {"type": "integer", "maximum": 64}
    expected = {"if": {"required": ["width"], "properties": {"width": width}}}
    expected["then"] = {"required": ["height"], "properties": {"height": height}}
    assert expected in rules


def test_the_default_bounds_need_no_budget_clause():
    """FLEET_MAX_SIDE defaults to the square root of FLEET_MAX_PIXELS: the side bounds imply
    the budget, and the document stays simple enough to fuzz."""
    rules = request_model(RequestBounds.of(SETTINGS)).model_json_schema()["allOf"]
    assert [rule["if"]["required"] for rule in rules] == [["webhook_events"]]


def test_defaults_that_would_be_refused_stop_the_settings():
    with pytest.raises(ValueError, match="FLEET_DEFAULT_WIDTH x FLEET_DEFAULT_HEIGHT"):
        Settings(default_width=1024)
    with pytest.raises(ValueError, match="FLEET_DEFAULT_STEPS"):
        Settings(default_steps=200)


def test_a_scheduler_is_a_diffusers_class_name_from_the_list():
    error = refused({"prompt": "a", "scheduler": "euler"})
    assert error.field == "scheduler" and "DPMSolverMultistepScheduler" in error.message
    assert refused({"prompt": "a", "scheduler": "FlaxDDIMScheduler"}).field == "scheduler"
    for name in SCHEDULERS:
        assert to_spec(validate_request({"prompt": "a", "scheduler": name}, SETTINGS), SETTINGS).scheduler == name
    assert to_spec(validate_request({"prompt": "a"}, SETTINGS), SETTINGS).scheduler is None  # the model's own
