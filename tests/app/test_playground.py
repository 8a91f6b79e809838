"""The playground page (``GET /playground``), in headless Chromium against the real API,
worker, Redis and S3: a person picks a model, submits, sees each step and the images."""

from __future__ import annotations

import re

import pytest
import requests

from tasks.keys import DEV_KEY
from tests.browser import chromium, screenshot, shown, text

pytestmark = pytest.mark.e2e


def test_the_page_and_its_files_are_served_here_and_load_nothing_from_elsewhere(api_url):
    page = requests.get(f"{api_url}/playground", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    for asset, media in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
        served = requests.get(f"{api_url}/playground/{asset}", timeout=10)
        assert served.status_code == 200 and served.headers["Content-Type"].startswith(media), asset
        assert not re.search(r"(?:https?:)?//[a-z]", served.text.replace("// ", "")), f"{asset} names another host"
    assert not re.search(r'(?:src|href)="(?:https?:)?//', page.text)
    assert requests.get(f"{api_url}/playground/other.js", timeout=10).status_code == 404


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    yield driver
    driver.quit()


def open_with_key(browser, api_url: str) -> None:
    """The page, the development key typed in (its change event lists the models)."""
    from selenium.webdriver.common.by import By

    browser.get(f"{api_url}/playground")
    key = browser.find_element(By.ID, "key")
    key.clear()
    key.send_keys(DEV_KEY)
    browser.find_element(By.ID, "prompt").click()
    shown(browser, "live worker")


def test_a_person_picks_a_model_submits_and_sees_every_step_and_the_images(api_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from fleet.processes import wait_for

    open_with_key(browser, api_url)
    model = Select(browser.find_element(By.ID, "model"))
    assert model.first_selected_option.get_attribute("value") == "tiny-model"
    assert "UniPCMultistepScheduler" in [
        o.get_attribute("value") for o in Select(browser.find_element(By.ID, "scheduler")).options
    ]
    steps = browser.find_element(By.ID, "steps")
    assert steps.get_attribute("max") == "100"
    steps.clear()
    steps.send_keys("6")
    browser.find_element(By.ID, "count").clear()
    browser.find_element(By.ID, "count").send_keys("2")
    browser.find_element(By.ID, "seed").send_keys("11")
    browser.execute_script("""
        window.seenSteps = [];
        new MutationObserver(() => window.seenSteps.push(document.getElementById("progress").value))
            .observe(document.getElementById("progress"), {attributes: true});
    """)
    browser.find_element(By.ID, "submit").click()

    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#images img")) == 2, 60, "two images shown")
    state = text(browser.find_element(By.ID, "state"))
    assert "SUCCEEDED" in state, state
    assert text(browser.find_element(By.ID, "error")) == ""
    job_id = re.search(r"Job ([0-9a-f]{32})", state).group(1)
    images = browser.find_elements(By.CSS_SELECTOR, "#images img")
    assert all(img.get_attribute("naturalWidth") == "64" for img in images)  # loaded, not broken
    links = [a.get_attribute("download") for a in browser.find_elements(By.CSS_SELECTOR, "#images a")]
    assert links == [f"{job_id}-0.png", f"{job_id}-1.png"]
    assert "seed 12" in text(browser.find_element(By.ID, "images"))
    assert steps.get_attribute("value") == "6"  # the form keeps what the person chose
    seen = browser.execute_script("return window.seenSteps")
    assert 6 in seen and len(set(seen)) >= 3, seen  # progress moved step by step, live
    screenshot(browser, "playground.png")


def test_a_refusal_is_shown_with_the_field_it_names(api_url, browser):
    from selenium.webdriver.common.by import By

    open_with_key(browser, api_url)
    browser.execute_script("""
        document.getElementById("job").noValidate = true;  // past the form's own check
        document.getElementById("steps").value = 500;
        document.getElementById("submit").click();
    """)
    shown(browser, "field: steps")
    assert "must be an integer from 1 to 100" in text(browser.find_element(By.ID, "error"))
    assert [e for e in browser.get_log("browser") if "422" not in e["message"]] == []  # nothing else failed
