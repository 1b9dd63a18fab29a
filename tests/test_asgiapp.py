"""A real ASGI application (fixtures/asgiapp: Starlette under uvicorn with two
server processes) beside a pool, run as the README says: `bgpool run
fixtures/asgiapp/config.py -- uvicorn fixtures.asgiapp.app:app --workers 2`.
Its lifespan awaits its dependencies with `aensure(..., fail_fast=True)`, its
requests await `aensure()` and read a worker's vars; a signal to `bgpool run`
reaches uvicorn once, and uvicorn's exit drains the pool.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import (
    ROOT,
    BgpoolRun,
    LeakCheck,
    Resources,
    assert_clean,
    file_line,
    free_port,
    gone,
    wait_for,
)

PATH = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
"""This environment's scripts first, so that COMMAND is `uvicorn` itself."""


@contextlib.contextmanager
def served(tmp_path: Path, workers: int = 2, **env: str) -> Iterator[tuple[BgpoolRun, str]]:
    """`bgpool run fixtures/asgiapp/config.py -- uvicorn fixtures.asgiapp.app:app
    --workers N` on a free port: the run (its stdout: the pool's lines; its
    stderr: uvicorn's) and the app's URL. Killed, all of it, if it still runs."""
    port = free_port()
    run = BgpoolRun(
        "fixtures/asgiapp/config.py", tmp_path,
        "--", "uvicorn", "fixtures.asgiapp.app:app", "--workers", str(workers),
        "--port", str(port),
        unbuffered=True, env={"PATH": PATH, **env},
    )  # fmt: skip
    try:
        yield run, f"http://127.0.0.1:{port}"
    finally:
        run.close()


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        result: dict[str, Any] = json.loads(reply.read())
    return result


def tracked(run: BgpoolRun, no_leaks: LeakCheck) -> Resources:
    """The pool `bgpool run` owns, its segments counted as this test's (asked
    as soon as it says its address: before uvicorn has even started)."""
    return no_leaks.track(run.address())


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_uvicorn_workers_serve_the_workers_vars_and_a_signal_stops_it_all(
    tmp_path: Path, no_leaks: LeakCheck, sig: signal.Signals
) -> None:
    with served(tmp_path) as (run, url):
        pool = tracked(run, no_leaks)

        def answer() -> dict[str, Any] | None:
            assert run.proc.poll() is None, run.text() + run.stderr()
            try:
                return get(url)
            except OSError:
                return None

        replies = [wait_for(answer, 30, "uvicorn to answer")]
        servers = {replies[0]["served_by"]}

        def both_answered() -> bool:
            replies.append(get(url))
            servers.add(replies[-1]["served_by"])
            return len(servers) == 2 and replies[-1]["flags"]["counter"] > 3

        wait_for(both_answered, 30, "both server processes to answer")
        children = psutil.Process(run.proc.pid).children()
        (uvicorn,) = [p for p in children if p.pid != pool.supervisor]
        assert "uvicorn" in " ".join(uvicorn.cmdline())
        processes = uvicorn.children()
        assert servers <= {p.pid for p in processes}, "uvicorn's own server processes"
        publishers = {r["flags"]["publisher"] for r in replies}
        assert len(publishers) == 1
        assert psutil.Process(publishers.pop()).ppid() == pool.supervisor  # a worker of the pool
        counters = [r["flags"]["counter"] for r in replies]
        assert counters == sorted(counters), "a newer snapshot, then an older one"
        # as a user (or a terminal's Ctrl-C, which reaches only `bgpool run`:
        # uvicorn runs in its own process group) stops it
        run.proc.send_signal(sig)
        assert run.wait(30) == 0, run.text() + run.stderr()
        uvicorn_said = run.stderr()
        assert uvicorn_said.count(f"Received {sig.name}, exiting") == 1, uvicorn_said  # once
        assert uvicorn_said.count("Application shutdown complete") == 2, uvicorn_said
        assert uvicorn_said.count("Application startup complete") == 2, uvicorn_said
        assert "uvicorn ended (exit status 0); stopping the pool" in run.text()
        assert run.text().rstrip().endswith("bgpool: stopped")
        assert gone(uvicorn.pid) and all(gone(p.pid) for p in processes)
        assert_clean(pool)  # supervisor, workers, segments, socket: all gone


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("workers", "status"),
    # uvicorn's exit status when a server process fails its startup: with
    # --workers 1, 3 (its STARTUP_FAILURE); with more, its master logs "failed
    # to start, stopping the parent process" and exits 0 (uvicorn 0.55).
    # `bgpool run` exits with whatever uvicorn exits with.
    [(2, 0), (1, 3)],
    ids=["workers-2", "workers-1"],
)
def test_a_dependency_that_cannot_boot_fails_the_servers_start(
    tmp_path: Path, no_leaks: LeakCheck, workers: int, status: int
) -> None:
    with served(tmp_path, workers, ASGIAPP_REQUIRES="flags,importer") as (run, _):
        pool = tracked(run, no_leaks)
        assert run.wait(60) == status, run.text() + run.stderr()  # it stops by itself
        uvicorn_said = run.stderr()
        assert_clean(pool)
    line = file_line(ROOT / "fixtures" / "asgiapp" / "workers.py", "with open(")
    assert (
        'bgpool.errors.WorkerBootFailed: background worker "importer" failed to boot: '
        "attempt 1 failed (exit status 1, target fixtures.asgiapp.workers:importer): "
        "FileNotFoundError: [Errno 2] No such file or directory: '/nonexistent/importer.json' "
        f"(fixtures/asgiapp/workers.py, line {line})"
    ) in uvicorn_said, uvicorn_said
    assert uvicorn_said.count("Application startup failed") == workers, uvicorn_said
    assert "Application startup complete" not in uvicorn_said, uvicorn_said
    if workers > 1:
        assert "failed to start, stopping the parent process" in uvicorn_said, uvicorn_said
    assert f"uvicorn ended (exit status {status}); stopping the pool" in run.text()
    assert run.text().rstrip().endswith("bgpool: stopped")
