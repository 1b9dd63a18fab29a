"""A real headless browser for the status page's tests: Debian's Chromium,
driven through Debian's chromedriver by selenium (``./scripts/test`` installs
both when they are missing).

Selenium, not Playwright: Playwright's Python package drives its own pinned
browser builds over its own protocol (a Node driver inside the wheel), and
tolerates another Chromium only loosely; selenium speaks WebDriver to the
chromedriver built from the same Debian source as the Chromium, so the two
always match, and nothing is downloaded (the driver and the browser are given
by path, so selenium-manager is never asked to find them).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

_ARGUMENTS = (
    "--headless=new",
    "--no-sandbox",  # the tests run as root
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--no-first-run",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--force-color-profile=srgb",
    "--window-size=1280,900",
)


def installed() -> bool:
    """Both the browser and its driver are there."""
    return CHROMIUM.exists() and CHROMEDRIVER.exists()


@contextlib.contextmanager
def chromium() -> Iterator[WebDriver]:
    """A headless Chromium session, quit (browser and driver ended) on exit."""
    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in _ARGUMENTS:
        options.add_argument(argument)
    service = Service(executable_path=str(CHROMEDRIVER), log_output=subprocess.DEVNULL)
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: WebDriver, path: Path, width: int) -> Path:
    """The whole page as it renders at ``width`` CSS pixels (a phone's 390, a
    desktop's 1280), saved as a PNG at ``path``."""
    metrics = {"width": width, "height": 800, "deviceScaleFactor": 1, "mobile": width < 600}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**metrics, "height": height})
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(os.fspath(path))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return path
