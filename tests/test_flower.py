"""Flower, with basic auth, sees the worker online and every job as its own task."""

from __future__ import annotations

import pytest
import requests

from fleet.processes import BIN, Server, wait_for
from tests.helpers import submit, wait_done

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def flower(fleet_env, work_dir, worker):
    server = Server("flower", [str(BIN / "fleet"), "flower"], env=fleet_env, log_dir=work_dir).start()
    url = f"http://127.0.0.1:{fleet_env['FLEET_FLOWER_PORT']}"
    user, _, password = fleet_env["FLEET_FLOWER_BASIC_AUTH"].partition(":")
    auth = (user, password)
    wait_for(lambda: requests.get(f"{url}/healthcheck", timeout=2).ok, 60, "flower", server.proc)
    yield url, auth
    server.stop()


def test_flower_requires_authentication(flower):
    url, _ = flower
    assert requests.get(f"{url}/api/workers", timeout=10).status_code == 401
    assert requests.get(f"{url}/api/workers", auth=("tester", "wrong"), timeout=10).status_code == 401


def test_flower_sees_the_worker_and_a_finished_job(flower, api_url):
    url, auth = flower
    workers = requests.get(f"{url}/api/workers", params={"refresh": "1"}, auth=auth, timeout=30).json()
    assert any(name.startswith("test-worker@") for name in workers)

    job = wait_done(api_url, submit(api_url, prompt="watched secretly", seed=3, steps=4))
    assert job["state"] == "SUCCEEDED" and job["task_id"] == job["id"], "the job's task is listed under its id"

    def task_succeeded() -> bool:
        info = requests.get(f"{url}/api/task/info/{job['id']}", auth=auth, timeout=10)
        return info.ok and info.json()["state"] == "SUCCESS"

    wait_for(task_succeeded, 30, "flower task event")
    info = requests.get(f"{url}/api/task/info/{job['id']}", auth=auth, timeout=10).json()
    assert info["name"] == "fleet.generate" and info["uuid"] == job["id"]
    assert info["worker"].startswith("test-worker@") and info["runtime"] > 0
    assert info["routing_key"] == job["queue"]
    batch = job["batch"]
    images = f"{batch['images']} image" + "s" * (batch["images"] != 1)
    assert info["result"] == repr(f"SUCCEEDED batch {batch['id']} ({images})")
    assert "secretly" not in str(info), "Flower never shows a prompt"
