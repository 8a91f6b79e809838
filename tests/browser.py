"""Headless Chromium for the tests that look at a page as a person would (Flower, the
playground): Debian's chromium and chromium-driver, never a browser Selenium downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fleet.processes import wait_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: The browser's window: the screenshots in docs/img are this size.
WINDOW = (1680, 760)


def chromium(headers: dict[str, str] | None = None):
    """A headless Chromium driver, sending ``headers`` with every request; fails under CI
    and skips elsewhere when the browser is not installed."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if os.environ.get("CI"):
            pytest.fail("headless Chromium is not installed: .ci/run installs Debian's chromium and chromium-driver")
        pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    if headers:
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": headers})
    driver.set_page_load_timeout(30)
    return driver


def text(element) -> str:
    """An element's text as the DOM has it (Selenium's rendered ``.text`` breaks spans that
    a page uses to ellipsize long names into lines)."""
    return " ".join(element.get_attribute("textContent").split())


def shown(driver, wanted: str, timeout_s: float = 30) -> None:
    """Until the page's text contains ``wanted`` (pages fill themselves by AJAX)."""
    from selenium.webdriver.common.by import By

    body = driver.find_element(By.TAG_NAME, "body")
    wait_for(lambda: wanted in text(body), timeout_s, f"'{wanted}' on {driver.title}")


def screenshot(driver, name: str) -> None:
    """Saved to ``FLEET_SCREENSHOTS`` when set (``docs/img``: the screenshots the docs show)."""
    directory = os.environ.get("FLEET_SCREENSHOTS")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(directory) / name))
