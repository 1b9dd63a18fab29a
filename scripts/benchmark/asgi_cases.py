"""The ASGI case: requests per second of fixtures/asgiapp (Starlette under
uvicorn with two server processes, run by `bgpool run fixtures/asgiapp/config.py
-- uvicorn fixtures.asgiapp.app:app --workers 2`) under a bounded load from
another process, on the route whose handler awaits `aensure()` and reads
`get_vars()` (`/`) and on the same handler without the two calls (`/bare`, the
baseline), in one run.

The load is a forked child with a fixed number of keep-alive connections, each
sending its next request as soon as the last one is answered (so at most that
many requests are in flight), for a fixed time per sample; the two routes'
samples alternate over the same connections, one of each per round. The
overhead is from the server processes' CPU time per request on each route
(/proc's schedstat, in nanoseconds): on a CPU-bound server it is what the
throughput loses, and other processes on a shared machine move it far less
than they move the requests per second."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .channels import in_child, wait_until
from .costs import schedstat_ns
from .harness import Bench

ROOT = Path(__file__).resolve().parents[2]
CONNECTIONS = 8
SAMPLE_SECONDS = 0.25
ROUNDS_PER_REP = 4  # rounds of one sample per route, per --reps
ROUTES = (("/bare", "baseline", "baseline: /bare, the handler without bgpool calls"),
          ("/", "bgpool", "bgpool /: await aensure() + get_vars()"))  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _served(port: int) -> Iterator[None]:
    """The app on `port` under `bgpool run`, its pool beside it, for a block
    (stopped with SIGTERM, as a user would, killed if that does not end it).
    `bgpool run`'s lines of the pool's states are left out (stdout)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": path}  # this environment's scripts
    server = subprocess.Popen(
        ["bgpool", "run", "fixtures/asgiapp/config.py", "--",
         "uvicorn", "fixtures.asgiapp.app:app", "--workers", "2",
         "--port", str(port), "--log-level", "warning", "--no-access-log"],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:

        def up() -> bool:
            if server.poll() is not None:
                raise RuntimeError(f"the ASGI app exited with status {server.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5):
                    return True
            except OSError:
                return False

        wait_until(up, 60, "the ASGI app to answer", poll=0.05)
        yield
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _requests(connection: Connection, request: bytes, until: float) -> int:
    """Requests one keep-alive connection had answered, one at a time, until `until`."""
    reader, writer = connection
    answered = 0
    while time.monotonic() < until:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 "):
            raise RuntimeError(f"the app answered {head.splitlines()[0]!r}")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        answered += 1
    return answered


def _cpu_seconds(pids: list[int]) -> float:
    """The CPU time the processes `pids` (every thread) have used so far, from
    /proc's schedstat: nanoseconds, where cpu_times() counts clock ticks of
    10 ms, which over a 0.25 s sample is an error of several percent."""
    tasks = [int(task) for pid in pids for task in os.listdir(f"/proc/{pid}/task")]
    return sum(schedstat_ns(task) or 0 for task in tasks) / 1e9


def _load(port: int, rounds: int, seconds: float, servers: list[int]) -> dict[str, Any]:
    """Runs in a forked child: per route, the requests per second of each
    sample, and the server processes' CPU time and requests over all of its
    samples; `rounds` rounds of one sample per route (in turn first), over
    the same connections."""

    async def main() -> dict[str, Any]:
        connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CONNECTIONS)]
        found: dict[str, Any] = {
            path: {"rps": [], "cpu": 0.0, "requests": 0} for path, *_ in ROUTES
        }
        try:
            for turn in range(rounds):
                for path, _, _ in ROUTES if turn % 2 else ROUTES[::-1]:
                    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
                    cpu, t0 = _cpu_seconds(servers), time.monotonic()
                    counts = await asyncio.gather(
                        *(_requests(c, request, t0 + seconds) for c in connections)
                    )
                    route = found[path]
                    route["rps"].append(sum(counts) / (time.monotonic() - t0))
                    route["cpu"] += _cpu_seconds(servers) - cpu
                    route["requests"] += sum(counts)
        finally:
            for _, writer in connections:
                writer.close()
        return found

    return asyncio.run(main())


def _server_processes(port: int) -> list[int]:
    """The pids of uvicorn's two server processes (each answer names its own)."""
    seen: set[int] = set()

    def both() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/bare", timeout=5) as reply:
            seen.add(json.loads(reply.read())["served_by"])
        return len(seen) == 2

    wait_until(both, 30, "both server processes to answer", poll=0)
    return sorted(seen)


def asgi_requests(bench: Bench) -> None:
    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        bench.skip("asgi_requests", f"{', '.join(missing)} not installed (the bench extra)")
        return
    port = _free_port()
    with _served(port):
        servers = _server_processes(port)
        in_child(_load, port, 1, SAMPLE_SECONDS, servers)  # a warm-up round
        rounds = ROUNDS_PER_REP * bench.config.reps
        found = in_child(_load, port, rounds, SAMPLE_SECONDS, servers)
    cpu_us = {path: 1e6 * r["cpu"] / r["requests"] for path, r in found.items()}
    overhead = 100 * (cpu_us["/"] / cpu_us["/bare"] - 1)
    params = {"connections": CONNECTIONS, "seconds_per_sample": SAMPLE_SECONDS,
              "server_processes": 2}  # fmt: skip
    for path, kind, subject in ROUTES:
        extra = {"server_cpu_us_per_request": cpu_us[path]}
        if path == "/":
            extra["overhead_pct"] = overhead
        bench.add("asgi_requests", subject, kind, found[path]["rps"], params, extra=extra)
    print(f"  asgi_requests      server CPU per request: {cpu_us['/bare']:.1f} us (/bare), "
          f"{cpu_us['/']:.1f} us (/): the two calls cost {overhead:.1f}%", flush=True)  # fmt: skip
