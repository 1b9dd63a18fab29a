"""The status page over HTTP: ``GET /`` is one self-contained HTML file shipped
in the package (nothing from another host, a Content-Security-Policy that
allows nothing else), and ``/status.json`` carries ``status()``,
``diagnostics()`` and the table's counters of a real pool whose workers crash,
fail at boot and publish vars. (What a person sees of it in a browser:
``test_status_page_browser.py``.)
"""

from __future__ import annotations

import fnmatch
import importlib.resources
import json
import os
import re
import signal
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    PAGE_WORKERS,
    ROOT,
    file_line,
    http_fetch,
    page_pool_workers,
    statuses,
    supervisor_pid,
    wait_for,
)

import bgpool
from bgpool import WorkerDiagnostics, WorkerStatus


def status_document(port: int) -> dict[str, Any]:
    code, headers, body = http_fetch(port, "/status.json")
    assert code == 200, body
    assert headers.get("Content-Type") == "application/json"
    assert headers.get("Cache-Control") == "no-store"
    document: dict[str, Any] = json.loads(body)
    return document


def by_name(document: dict[str, Any], key: str) -> dict[str, dict[str, Any]]:
    """``document[key]``'s entries by ``scope:name``."""
    return {f"{e['scope']}:{e['name']}": e for e in document[key]}


def test_the_page_is_package_data_and_loads_nothing_from_elsewhere(
    make_pool: Callable[..., Any],
) -> None:
    pool = make_pool([bgpool.WorkerSpec(name="w", target="fixtures.workers:idle", num=1)],
                     metrics_port=0)  # fmt: skip
    code, headers, body = http_fetch(pool.metrics_port, "/")
    assert code == 200
    assert headers.get("Content-Type") == "text/html; charset=utf-8"
    shipped = importlib.resources.files("bgpool.app").joinpath("status.html").read_bytes()
    assert body == shipped
    policy = headers.get("Content-Security-Policy", "")
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy, policy

    page = body.decode()
    # every reference is relative to the page's own origin (or inline data)
    references = re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)""", page)
    assert references, "the page links its JSON endpoints"
    for ref in references:
        assert ref.startswith("data:") or not re.match(r"^([a-z]+:|//|/)", ref), ref
    assert "@import" not in page and "url(" not in page
    assert not re.search(r"<script[^>]+src", page) and 'rel="stylesheet"' not in page
    assert 'fetch("status.json"' in page

    # a non-editable install ships it: the package data lists it
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["bgpool"]
    assert any(fnmatch.fnmatch("app/status.html", p) for p in patterns), patterns


def test_status_json_carries_status_diagnostics_and_counters(
    make_pool: Callable[..., Any], sentinel_dir: Path
) -> None:
    fail_flag = sentinel_dir / "importer-fails"
    fail_flag.touch()
    pool = make_pool(page_pool_workers(fail_flag), metrics_port=0)
    port = pool.metrics_port
    with pytest.raises(bgpool.EnsureTimeout):
        pool.ensure("importer", timeout=0.3)
    pool.restart_workers("mailer")  # restarts that are not crashes
    (thumbnailer,) = statuses(pool, "thumbnailer")
    assert thumbnailer.pid is not None
    os.kill(thumbnailer.pid, signal.SIGUSR1)

    def settled() -> dict[str, Any] | None:
        document = status_document(port)
        counters = by_name(document, "counters")
        diagnostics = by_name(document, "diagnostics")
        restarted = [s for s in document["status"] if s["name"] == "thumbnailer"]
        calm = (
            counters[":thumbnailer"]["restarts"] == 1
            and diagnostics[":feeds"]["vars_generation"] == 3
            and [s["state"] for s in restarted] == ["ready"]  # in this document, not later
        )
        return document if calm else None

    document = wait_for(settled, timeout=10, what="the thumbnailer's crash and the feeds' vars")
    assert document["pool"] == {
        "name": None,
        "address": pool.address,
        "supervisor_pid": supervisor_pid(pool),
        "running": True,
        "live": True,
        "live_error": None,
        "ready": True,
        "waiting": [],
    }
    assert document["diagnostics_error"] is None

    # status(): one WorkerStatus per instance, as the table has them
    instances = [WorkerStatus.model_validate(s) for s in document["status"]]
    expected = {(s.scope, s.name, s.instance) for s in pool.status()}
    assert {(s.scope, s.name, s.instance) for s in instances} == expected
    stable = [s for s in instances if s.name in ("mailer", "feeds", "search-index")]
    assert all(s.state == "ready" and s.pid for s in stable), stable
    mine = {(s.scope, s.name, s.instance): s for s in pool.status()}
    assert all(mine[(s.scope, s.name, s.instance)] == s for s in stable)

    # diagnostics(): one WorkerDiagnostics per name, the same as asked directly
    diagnostics = {k: WorkerDiagnostics.model_validate(d) for k, d in by_name(
        document, "diagnostics").items()}  # fmt: skip
    assert set(diagnostics) == {":mailer", ":thumbnailer", ":feeds", ":importer", ":reports",
                                "api:search-index"}  # fmt: skip
    assert diagnostics[":mailer"] == pool.diagnostics("mailer")
    crash = diagnostics[":thumbnailer"].last_error
    assert crash is not None and crash.type == "MemoryError"
    assert crash.filename is not None and Path(crash.filename).resolve() == PAGE_WORKERS
    assert crash.lineno == file_line(PAGE_WORKERS, "THUMB_LINE")
    boot = diagnostics[":importer"].last_error
    assert boot is not None and boot.type == "ConnectionRefusedError"
    assert boot.lineno == file_line(PAGE_WORKERS, "IMPORT_LINE")
    assert diagnostics[":feeds"].vars_generation == 3

    # the table's counters, as /metrics counts them
    counters = by_name(document, "counters")
    assert {k: (c["crashes"], c["restarts"], c["boots"]) for k, c in counters.items()
            if k != ":importer"} == {
        ":mailer": (0, 2, 4), ":thumbnailer": (1, 1, 2), ":feeds": (0, 0, 1),
        ":reports": (0, 0, 1), "api:search-index": (0, 0, 1),
    }  # fmt: skip
    importer = counters[":importer"]
    assert importer["crashes"] >= 1 and importer["boots"] == 0, importer
    assert 0 < counters[":mailer"]["boot_seconds_sum"] < 10
