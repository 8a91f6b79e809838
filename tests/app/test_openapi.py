"""The OpenAPI document is complete and truthful: valid OpenAPI 3.1, every route in it, its
request schema exactly what the API accepts (under the default bounds and others), the
live API fuzzed against it by schemathesis, and its interactive docs served offline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from openapi_spec_validator import validate
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app import create_app
from app.docs import ASSETS
from app.jobs import IDEMPOTENCY_KEY_PATTERN
from app.openapi import openapi_path
from app.waiting import parse_prefer_wait
from tasks.cancel import parse_duration
from tasks.errors import ValidationFailed
from tasks.keys import DEV_KEY
from tasks.request import validate_request
from tasks.settings import Settings
from tasks.webhooks import check_webhook_url
from tests.app.test_api import authed
from tests.helpers import http, sse, submit

#: The default bounds, and wide images within a small budget with literal webhook addresses.
CONFIGS = {
    "default": Settings(),
    "wide": Settings(
        max_side=128, max_pixels=64 * 128, default_width=64, default_height=128, webhook_allow_private=True
    ),
}


def served(config: Settings) -> dict:
    client = create_app({"SETTINGS": config, "TESTING": True}).test_client()
    return client.get("/openapi.json").get_json()


@pytest.mark.parametrize("name", CONFIGS)
def test_the_document_is_valid_openapi(name):
    validate(served(CONFIGS[name]))


def test_every_route_is_documented_with_its_methods():
    app = create_app({"SETTINGS": Settings(), "TESTING": True})
    paths = served(Settings())["paths"]
    routes = {
        (openapi_path(rule.rule), method.lower())
        for rule in app.url_map.iter_rules()
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}
    }
    assert routes == {(path, method) for path, operations in paths.items() for method in operations}


def test_the_body_examples_are_valid_requests():
    for operations in served(Settings())["paths"].values():
        for op in operations.values():
            media = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            if media.get("schema") == {"$ref": "#/components/schemas/JobRequest"}:
                validate_request(media["example"], Settings())


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize("name", CONFIGS)
def test_the_request_schema_is_exactly_what_the_api_accepts(name, mode):
    """Bodies and headers generated from the document: every valid one passes the checks
    ``POST /v1/jobs`` makes, every invalid one fails one of them."""
    config = CONFIGS[name]
    document = served(config)
    del document["paths"]["/v1/jobs"]["post"]["security"]  # keys: tests/app/test_keys.py
    operation = schemathesis.openapi.from_dict(document)["/v1/jobs"]["POST"]

    def accepted(case) -> bool:
        try:
            request = validate_request(case.body, config)
            if request.webhook is not None:
                check_webhook_url(request.webhook, config)
            parse_prefer_wait(case.headers.get("Prefer"))
            if "Cancel-After" in case.headers:
                parse_duration(case.headers["Cancel-After"])
            key = case.headers.get("Idempotency-Key")
            if key is not None and not IDEMPOTENCY_KEY_PATTERN.fullmatch(key):
                return False
        except ValidationFailed:
            return False
        return True

    @settings(max_examples=100, deadline=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(operation.as_strategy(generation_mode=mode))
    def check(case):
        assert accepted(case) is (mode is GenerationMode.POSITIVE), (case.body, case.headers)

    check()


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b", "\x7f", "\x85", "\x0b", "\x0c"])
@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_control_characters_in_prompts_are_a_422_naming_the_field(char, field):
    client = authed(create_app({"SETTINGS": Settings(), "TESTING": True}))
    response = client.post("/v1/jobs", json={"prompt": "a", field: f"a{char}b"})
    assert response.status_code == 422
    assert response.get_json()["error"]["field"] == field


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": "", "width": 0}, "prompt"),
        ({"prompt": "a", "width": 0}, "width"),
        ({"prompt": "\u3000\u200b "}, "prompt"),  # blank, though str.strip() keeps the \u200b
        ({"prompt": "a", "webhook": "http://203.0.113.9/hook"}, "webhook"),  # literal: FLEET_WEBHOOK_ALLOW_PRIVATE
    ],
)
def test_what_the_document_refuses_is_a_422(body, field):
    client = authed(create_app({"SETTINGS": Settings(), "TESTING": True}))
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422 and response.get_json()["error"]["field"] == field


def test_the_docs_page_and_its_files_are_served_from_the_package():
    client = create_app({"SETTINGS": Settings(), "TESTING": True}).test_client()
    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    links = re.findall(r'(?:src|href|url:)\s*=?\s*"([^"]+)"', html)
    assert set(links) == {
        "/docs/swagger-ui.css",
        "/docs/favicon-32x32.png",
        "/docs/swagger-ui-bundle.js",
        "/openapi.json",
    }
    assert "validatorUrl: null" in html  # Swagger UI would otherwise send the document to its validator
    for name, media in ASSETS.items():
        asset = client.get(f"/docs/{name}")
        assert asset.status_code == 200 and asset.mimetype == media and asset.data
    assert client.get("/docs/swagger-ui-bundle.js").data.startswith(b"/*!")
    assert client.get("/docs/LICENSE").status_code == 404


# -- the live API --------------------------------------------------------------------------

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    positive_data_acceptance,
    negative_data_rejection,
]


#: Every phase schemathesis has, each case checked with every check that needs no other
#: tool; at least ``MIN_CASES`` cases in all (about 900, most of them the coverage phase's).
PHASES = "examples,coverage,fuzzing,stateful"
EXAMPLES_PER_OPERATION = 15
MIN_CASES = 500
#: Auth as the document declares it (so the coverage phase can leave it out and expect a
#: 401); the OpenAI route's 504 is what the idle queue (0.2 s hold, no worker) gives a valid
#: request: documented, and the only 5xx allowed.
ST_CONFIG = f"""
[auth.openapi.apiKey]
bearer = "{DEV_KEY}"

[[operations]]
include-name = "POST /v1/images/generations"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "504"]
"""
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_the_live_api_keeps_its_document(idle_api, tmp_path):
    """schemathesis's every phase (examples, coverage, fuzzing, stateful) against the real
    API (gunicorn, Redis, S3; jobs stay QUEUED until their 1 s Cancel-After): no 5xx, no
    status, header, body or stream event the document does not describe, no valid request
    refused and no invalid one accepted, in at least ``MIN_CASES`` cases."""
    config, report = tmp_path / "schemathesis.toml", tmp_path / "run.json"
    config.write_text(ST_CONFIG)
    command = [str(Path(sys.executable).parent / "st"), "--config-file", str(config), "run", f"{idle_api}/openapi.json"]
    # One worker: schemathesis's workers are threads, and on CPython 3.11 two threads building
    # ASTs at once (hypothesis reads each filter lambda's source) can raise a spurious
    # "SystemError: AST constructor recursion depth mismatch" (python/cpython#106905): it
    # failed one full run in three.
    command += ["--phases", PHASES, "--max-examples", str(EXAMPLES_PER_OPERATION), "--workers", "1"]
    command += ["--request-timeout", "10", "--no-color", "--report", "json", "--report-json-path", str(report)]
    # Run from tmp_path: schemathesis keeps a cache of crashes in its working directory.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.app.schemathesis_hooks", "PYTHONPATH": path}
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=270)
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    result = json.loads(report.read_text())
    assert result["complete"] and not result["failures"] and not result["errors"], run.stdout[-20000:]
    assert all(phase["status"] == "success" for phase in result["phases"].values()), result["phases"]
    assert result["test_cases"]["generated"] >= MIN_CASES, result["test_cases"]
    print(f"schemathesis: {result['test_cases']['generated']} cases in {result['running_time']:.0f} s")


@pytest.mark.e2e
def test_a_job_s_answers_match_the_document(idle_api):
    """What fuzzing cannot reach with made-up ids: a real job read, canceled, and streamed."""
    schema = schemathesis.openapi.from_url(f"{idle_api}/openapi.json")
    doc = requests.get(f"{idle_api}/openapi.json", timeout=10).json()
    job_schema = jsonschema.Draft202012Validator({"$ref": "#/components/schemas/Job", "components": doc["components"]})
    job_id = submit(idle_api, prompt="documented", webhook="https://hooks.example/in")
    for method, path in [("GET", "/v1/jobs/{job_id}"), ("POST", "/v1/jobs/{job_id}/cancel")] * 2:
        case = schema[path][method].Case(path_parameters={"job_id": job_id}, headers=dict(http.headers))
        response = case.call_and_validate(checks=CHECKS)
        assert response.status_code == 200
    with http.get(f"{idle_api}/v1/jobs/{job_id}/events", stream=True, timeout=10) as response:
        assert response.status_code == 200 and response.headers["Cache-Control"] == "no-cache"
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = list(sse(response))
    assert [name for name, _ in events] == ["state"]
    job_schema.validate(events[0][1])
    assert events[0][1]["state"] == "CANCELED"
