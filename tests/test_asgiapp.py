"""A real ASGI application (fixtures/asgiapp: Starlette under uvicorn with two
server processes) beside a pool: its lifespan awaits its dependencies with
`aensure(..., fail_fast=True)`, its requests await `aensure()` and read a
worker's vars.

The pool's owner is `fixtures.asgiapp.serve` (what `bgpool run CONFIG --
COMMAND` will be), which runs uvicorn with BGPOOL_ADDRESS set.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import ROOT, file_line, free_port, kill_all, subprocess_env, wait_for


@contextlib.contextmanager
def served(tmp_path: Path, **env: str) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """`python -m fixtures.asgiapp.serve -- uvicorn fixtures.asgiapp.app:app
    --workers 2` on a free port: the process, its URL, and the file that gets
    its output (uvicorn's, the pool's). Stopped afterwards if it still runs."""
    port = free_port()
    output = tmp_path / "server.out"
    with open(output, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "fixtures.asgiapp.serve", "--",
             sys.executable, "-m", "uvicorn", "fixtures.asgiapp.app:app",
             "--workers", "2", "--port", str(port)],
            cwd=ROOT, env=subprocess_env(**env), stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield server, f"http://127.0.0.1:{port}", output
    finally:
        if server.poll() is None:  # failure path: stopped as by a user, else killed
            server.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(20)
        if server.poll() is None:
            with contextlib.suppress(psutil.Error):
                kill_all(psutil.Process(server.pid).children(recursive=True))
            server.kill()
            server.wait(10)


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        result: dict[str, Any] = json.loads(reply.read())
    return result


@pytest.mark.timeout(90)
def test_uvicorn_workers_serve_the_workers_vars(tmp_path: Path) -> None:
    with served(tmp_path) as (server, url, output):

        def answer() -> dict[str, Any] | None:
            assert server.poll() is None, output.read_text()
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
        master = psutil.Process(server.pid).children()
        uvicorn = [p for p in master if "uvicorn" in " ".join(p.cmdline())]
        assert len(uvicorn) == 1, master
        assert servers <= {p.pid for p in uvicorn[0].children()}, "uvicorn's own workers"
        publishers = {r["flags"]["publisher"] for r in replies}
        assert len(publishers) == 1
        supervisor = psutil.Process(publishers.pop()).parent()  # a worker of the pool's
        assert supervisor is not None and supervisor.ppid() == server.pid
        assert supervisor.cmdline()[0].startswith("bgpool: supervisor ")
        counters = [r["flags"]["counter"] for r in replies]
        assert counters == sorted(counters), "a newer snapshot, then an older one"
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0, output.read_text()
    text = output.read_text()
    assert text.count("Application startup complete") == 2, text


@pytest.mark.timeout(90)
def test_a_dependency_that_cannot_boot_fails_the_servers_start(tmp_path: Path) -> None:
    with served(tmp_path, ASGIAPP_REQUIRES="flags,importer") as (server, _, output):
        server.wait(60)  # it stops by itself
        text = output.read_text()
    line = file_line(ROOT / "fixtures" / "asgiapp" / "workers.py", "with open(")
    assert (
        'bgpool.errors.WorkerBootFailed: background worker "importer" failed to boot: '
        "attempt 1 failed (exit status 1, target fixtures.asgiapp.workers:importer): "
        "FileNotFoundError: [Errno 2] No such file or directory: '/nonexistent/importer.json' "
        f"(fixtures/asgiapp/workers.py, line {line})"
    ) in text, text
    assert "Application startup failed" in text, text
    assert "Application startup complete" not in text, text
    assert "failed to start, stopping the parent process" in text, text
