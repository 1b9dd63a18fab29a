"""The status page as a person sees it: rendered by a real headless Chromium
(Debian's, driven through Debian's chromedriver by selenium; ``./scripts/test``
installs both when they are missing), against a real pool whose workers crash,
fail at boot, publish vars and are stopped. One browser session for the whole
module's story, so it stays fast.

Selenium, not Playwright: Playwright's Python package drives its own pinned
browser builds (a Node driver inside the wheel) and takes another Chromium only
loosely; selenium speaks WebDriver to the chromedriver built from the same
Debian source as the Chromium, so the two always match, and nothing is
downloaded (browser and driver are given by path: selenium-manager is never
asked to find them).

Screenshots of the page at a phone's width (390 px) and a desktop's (1280 px)
go to ``$BGPOOL_SCREENSHOTS`` (a directory; the test's temporary one if unset):
the README's ``docs/status-page.png`` is the wide one, from a run of this test.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import PAGE_WORKERS, file_line, page_pool_workers, statuses, supervisor_pid, wait_for
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver

import bgpool

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

ARGUMENTS = (
    "--headless=new",
    "--no-sandbox",  # the suite runs as root
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--no-first-run",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--force-color-profile=srgb",
    "--lang=en-GB",
    "--window-size=1280,900",
)

READY_GREEN = "rgb(31, 157, 85)"
STOPPED_GREY = "rgb(107, 114, 128)"


@contextlib.contextmanager
def chromium() -> Iterator[WebDriver]:
    """A headless Chromium session; quit (browser and driver ended) on exit."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(f"{CHROMIUM} or {CHROMEDRIVER} is missing: ./scripts/test installs them")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in ARGUMENTS:
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=str(CHROMEDRIVER), log_output=subprocess.DEVNULL)
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: WebDriver, path: Path, width: int) -> tuple[int, int]:
    """Save the whole page as it renders at ``width`` CSS pixels as a PNG at
    ``path``; returns the image's size."""
    metrics = {"width": width, "height": 800, "deviceScaleFactor": 1, "mobile": width < 600}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**metrics, "height": height})
    assert driver.execute_script("return document.documentElement.scrollWidth") <= width, (
        f"the page is wider than {width} px"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(os.fspath(path))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", header
    size: tuple[int, int] = struct.unpack(">II", header[16:24])
    return size


def seen(driver: WebDriver, worker: str, field: str | None = None) -> str | None:
    """The text a person sees in ``worker``'s card (``scope:name``), or in one
    of its fields; None while it is not there. (One script call: the page
    redraws its cards every second.)"""
    selector = f'section[data-worker="{worker}"]' + (f' [data-field="{field}"]' if field else "")
    text: str | None = driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;", selector
    )
    return text


def pill_colour(driver: WebDriver, worker: str) -> str:
    colour: str = driver.execute_script(
        "return getComputedStyle(document.querySelector(arguments[0])).backgroundColor;",
        f'section[data-worker="{worker}"] .state',
    )
    return colour


def banner(driver: WebDriver) -> str:
    text: str = driver.execute_script(
        "const b = document.getElementById('banner');"
        "return getComputedStyle(b).display === 'none' ? '' : b.innerText;"
    )
    return text


def test_the_page_shows_the_pool_and_follows_it_live(
    make_pool: Callable[..., Any], sentinel_dir: Path, tmp_path: Path
) -> None:
    shots = Path(os.environ.get("BGPOOL_SCREENSHOTS") or tmp_path)
    fail_flag = sentinel_dir / "importer-fails"
    fail_flag.touch()
    pool = make_pool(page_pool_workers(fail_flag), metrics_port=0, grace_period=2.0)
    with pytest.raises(bgpool.EnsureTimeout):
        pool.ensure("importer", timeout=0.3)
    pool.stop("reports")
    url = f"http://127.0.0.1:{pool.metrics_port}/"

    with chromium() as driver:
        driver.get(url)
        wait_for(lambda: seen(driver, ":reports", "state") == "stopped", what="the cards")
        driver.execute_script("window.loadedOnce = true;")  # gone if the page reloads

        # every worker, its state in words and in colour
        states = {
            ":mailer": "ready", ":thumbnailer": "ready", ":feeds": "ready",
            ":reports": "stopped", "api:search-index": "ready",
        }  # fmt: skip
        for worker, state in states.items():
            assert seen(driver, worker, "state") == state, worker
        assert seen(driver, ":importer", "state") in ("backoff", "starting")
        assert pill_colour(driver, ":mailer") == READY_GREEN
        assert pill_colour(driver, ":reports") == STOPPED_GREY
        search = seen(driver, "api:search-index") or ""
        assert search.startswith("search-index\napi\n"), search  # its scope beside its name
        mailer = seen(driver, ":mailer") or ""
        for status in statuses(pool, "mailer"):
            assert str(status.pid) in mailer, mailer
        wait_for(lambda: seen(driver, ":feeds", "vars_generation") == "3", what="vars gen 3")

        # the importer's boot failure, with its file and line
        importer = seen(driver, ":importer", "last_error") or ""
        assert "ConnectionRefusedError: database at db:5432 refused the connection" in importer
        assert f"page_workers.py, line {file_line(PAGE_WORKERS, 'IMPORT_LINE')}" in importer

        # a crash turns the counts up, and shows its error, without a reload
        assert seen(driver, ":thumbnailer", "restarts") == "0"
        assert seen(driver, ":thumbnailer", "last_error") is None
        (thumbnailer,) = statuses(pool, "thumbnailer")
        assert thumbnailer.pid is not None
        os.kill(thumbnailer.pid, signal.SIGUSR1)
        wait_for(lambda: seen(driver, ":thumbnailer", "restarts") == "1", what="restarts 1")
        assert seen(driver, ":thumbnailer", "crashes") == "1"
        crash = seen(driver, ":thumbnailer", "last_error") or ""
        assert "MemoryError: image too large to thumbnail: 48000x32000 px" in crash, crash
        assert f"page_workers.py, line {file_line(PAGE_WORKERS, 'THUMB_LINE')}" in crash, crash
        wait_for(lambda: seen(driver, ":thumbnailer", "state") == "ready", what="ready again")
        assert driver.execute_script("return window.loadedOnce === true;"), "the page reloaded"

        assert screenshot(driver, shots / "status-page.png", 1280)[0] == 1280
        assert screenshot(driver, shots / "status-page-phone.png", 390)[0] == 390

        # a frozen supervisor: said at the top, the states still shown
        pid = supervisor_pid(pool)
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_for(lambda: "does not answer" in banner(driver), what="the frozen banner")
            assert seen(driver, ":mailer", "state") == "ready"
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: banner(driver) == "", what="the banner gone")

        # what a requirement, a policy and a lease add is shown in words, and a
        # diagnostics field this page does not know (a later bgpool's) by its
        # name: the page's own render() of a document with them
        shown = driver.execute_async_script(
            """const done = arguments[arguments.length - 1];
            fetch("status.json").then(r => r.json()).then(doc => {
              const d = doc.diagnostics.find(d => d.name === "thumbnailer");
              Object.assign(d, {waiting_for: ["db-proxy"], last_recycle_reason: "memory",
                singleton: true, favourite_colour: "teal", holder: {host: "web-2", pid: 41,
                since: new Date().toISOString(), lease_token: 7, ready: true, here: false}});
              const c = doc.counters.find(c => c.name === "thumbnailer");
              Object.assign(c, {hangs: 2, recycles: 3});
              render(doc);
              done(document.querySelector('section[data-worker=":thumbnailer"]').innerText);
            });"""
        )
        assert re.search(r"waiting for\s+db-proxy", shown), shown
        assert re.search(r"lease\s+held by web-2, pid 41 since .* ago \(token 7, ready\)", shown)
        assert re.search(r"hangs\s+2\s+recycles\s+3 \(last: memory\)", shown), shown
        assert re.search(r"favourite colour\s+teal", shown), shown
        assert "singleton" not in shown.lower(), shown  # laid out, not listed again

        # nothing came from anywhere but the page's own origin, and nothing failed
        origins = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin);"
        )
        assert set(origins) <= {url.rstrip("/")}, origins
        log = driver.get_log("browser")  # type: ignore[no-untyped-call]
        errors = [e for e in log if e["level"] == "SEVERE"]
        assert not errors, errors
        assert driver.execute_script("return window.loadedOnce === true;"), "the page reloaded"
