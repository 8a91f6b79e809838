"""The fleet as an operator watches it, on real processes: the API's metrics add up across
gunicorn's processes, JSON logs follow one job from its request to its upload, and the
worker's metrics show what it ran."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from fleet.local import api_metrics_path
from fleet.processes import free_port, wait_for
from fleet.stack import start_api, start_worker
from tests.helpers import submit, wait_done
from tests.stack import start_redis

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def observed(fleet_env, work_dir, tiny_model):
    """A fleet of its own (its own Redis: no other test's worker takes its jobs) logging
    JSON, with two API processes."""
    redis_server, redis_url = start_redis(work_dir)
    env = {
        **fleet_env,
        "FLEET_REDIS_URL": redis_url,
        "FLEET_API_PORT": str(free_port()),
        "FLEET_WORKER_METRICS_PORT": str(free_port()),
        "FLEET_LOG_FORMAT": "json",
        "FLEET_MAX_WAIT_MS": "200",
    }
    started = []
    try:
        worker = start_worker(env, work_dir, "observed-worker")
        started.append(worker)
        api, url = start_api(env, work_dir, workers=2, name="observed-api")
        started.append(api)
        yield env, url, api, worker
    finally:
        for server in reversed(started):
            server.stop()
        redis_server.stop()


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def json_lines(log: str) -> list[dict]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def test_the_api_counts_requests_across_its_gunicorn_processes(observed):
    """N requests, whichever process answered each: every scrape, whichever process answers
    it, says N."""
    env, url, _, _ = observed
    directory = api_metrics_path(Path(env["FLEET_STATE_DIR"]), int(env["FLEET_API_PORT"]))

    def counting_processes() -> int:
        return len(list(directory.glob("counter_*.db")))

    sent = 0
    while sent < 20 or (counting_processes() < 2 and sent < 400):
        assert requests.get(f"{url}/healthz", timeout=10).status_code == 200  # a new connection each
        sent += 1
    assert counting_processes() == 2, f"one process served all {sent} requests"
    key = ("fleet_api_requests_total", frozenset({"route": "/healthz", "method": "GET", "status": "200"}.items()))
    assert {scrape(url)[key] for _ in range(8)} == {sent}


def test_json_logs_follow_one_job_from_its_request_to_its_upload(observed):
    env, url, api, worker = observed
    job = wait_done(url, submit(url, prompt="followed", seed=5, steps=4))
    assert job["state"] == "SUCCEEDED"
    job_id, batch_id = job["id"], job["batch"]["id"]

    def api_lines() -> list[dict]:
        return [line for line in json_lines(api.log()) if line.get("job_id") == job_id]

    wait_for(lambda: any(line.get("method") == "POST" for line in api_lines()), 10, "the access line")
    request_line = next(line for line in api_lines() if line.get("method") == "POST")
    assert request_line["path"] == "/v1/jobs" and request_line["status"] == 202
    assert request_line["logger"] == "gunicorn.access" and request_line["service"] == "api"
    assert any(line["message"].startswith("accepted job") for line in api_lines())

    def worker_lines() -> list[dict]:
        return [line for line in json_lines(worker.log()) if line.get("job_id") == job_id]

    # The record says SUCCEEDED a moment before the worker logs it, and Celery its task's end.
    wait_for(lambda: any(line.get("runtime_s") for line in worker_lines()), 10, "the task's last line")
    mentions = [line for line in worker.log().splitlines() if job_id in line]
    assert all(line.startswith("{") for line in mentions), "every line naming the job is JSON"
    lines = worker_lines()
    messages = [line["message"] for line in lines]
    assert any(re.match(r"Task fleet\.generate\[.*\] received", m) for m in messages)
    uploaded = next(line for line in lines if "uploaded" in line["message"])
    assert uploaded["batch_id"] == batch_id and uploaded["service"] == "worker"
    assert uploaded["worker"].startswith("observed-worker@") and uploaded["image_keys"]
    assert any(line.get("state") == "SUCCEEDED" for line in lines)
    batch = next(line for line in json_lines(worker.log()) if line.get("batch_id") == batch_id and "job_ids" in line)
    assert job_id in batch["job_ids"]
    assert "followed" not in json.dumps(lines + [batch]), "no line carries the prompt"


def test_the_worker_exports_what_it_ran(observed):
    env, url, _, _ = observed
    wait_done(url, submit(url, prompt="metered", seed=6, steps=4))
    found = scrape(f"http://127.0.0.1:{env['FLEET_WORKER_METRICS_PORT']}")
    assert found[("fleet_images_total", frozenset())] >= 1
    assert found[("fleet_engine_start_seconds", frozenset({"phase": "load", "compile": "off"}.items()))] > 0
    info = [labels for name, labels in found if name == "fleet_worker_info"]
    assert len(info) == 1 and "fleet.interactive" in dict(info[0])["queues"]
    assert dict(info[0])["model"] == "tiny-model"  # the registry's name (FLEET_MODEL's directory)
    assert found[("fleet_worker_jobs", frozenset({"queue": "fleet.interactive"}.items()))] == 0
    assert found[("fleet_job_seconds_count", frozenset())] >= 1
