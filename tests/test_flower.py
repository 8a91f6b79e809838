"""Flower, with basic auth, sees the worker online and its queues, and every job as its
own task under its job id, with its state, worker, runtime and batch; an operator's view of
it is checked in headless Chromium (``FLEET_SCREENSHOTS=docs/img`` saves the screenshots the
docs show)."""

from __future__ import annotations

import base64
import time

import pytest
import requests

from fleet.processes import BIN, Server, wait_for
from tests.browser import chromium, screenshot, shown, text
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
    assert info["result"] == repr(f"SUCCEEDED batch {batch['id']} ({images}) on {job['request']['model']}")
    assert "secretly" not in str(info), "Flower never shows a prompt"


# -- in a browser, as an operator ----------------------------------------------------------


@pytest.fixture(scope="module")
def browser(flower):
    """Headless Chromium, logged in to Flower (its basic auth header on every request)."""
    _, (user, password) = flower
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    driver = chromium({"Authorization": f"Basic {token}"})
    yield driver
    driver.quit()


def test_an_operator_finds_the_worker_its_queues_and_each_job_by_its_id(flower, browser, api_url):
    from selenium.webdriver.common.by import By

    url, _ = flower
    ids = [submit(api_url, prompt=f"private prompt {i}", seed=i, steps=4, num_images=1 + i % 2) for i in range(6)]
    jobs = [wait_done(api_url, job_id) for job_id in ids]
    assert all(job["state"] == "SUCCEEDED" for job in jobs)
    worker = jobs[0]["worker"]

    browser.get(f"{url}/")
    shown(browser, worker)

    def online_and_idle() -> bool:  # its active count comes with its heartbeats, every 2 s
        cells = [text(cell) for cell in browser.find_elements(By.XPATH, f"//tr[contains(., '{worker}')]/td")]
        return cells[1:3] == ["Online", "0"]

    wait_for(online_and_idle, 30, "the worker online and idle")
    screenshot(browser, "flower-dashboard.png")

    browser.get(f"{url}/tasks")
    for job in jobs:
        shown(browser, job["id"])
        row = text(browser.find_element(By.XPATH, f"//tr[contains(., '{job['id']}')]"))
        assert "SUCCESS" in row and f"SUCCEEDED batch {job['batch']['id']}" in row, row
        assert worker in row and job["queue"] in row, row
    assert "private prompt" not in browser.page_source, "Flower never shows a prompt"
    screenshot(browser, "flower-tasks.png")

    browser.get(f"{url}/task/{jobs[1]['id']}")
    shown(browser, "SUCCESS")
    page = text(browser.find_element(By.TAG_NAME, "body"))
    assert jobs[1]["id"] in page and worker in page and f"batch {jobs[1]['batch']['id']}" in page
    assert "Runtime" in page and "private prompt" not in browser.page_source

    browser.get(f"{url}/worker/{worker}")
    browser.find_element(By.ID, "worker-tab-queues").click()
    queues = browser.find_element(By.ID, "worker-queues")
    wait_for(lambda: queues.is_displayed(), 10, "the worker's queues tab")
    time.sleep(0.5)  # the tab fades in
    assert {"fleet.interactive", "fleet.batch"} <= set(text(queues).split()), text(queues)
    screenshot(browser, "flower-worker-queues.png")
