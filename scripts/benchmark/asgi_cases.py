"""The ASGI case: requests per second of fixtures/asgiapp (Starlette under
uvicorn with two server processes, beside a pool owned by
`fixtures.asgiapp.serve`) under a bounded load from another process, on the
route whose handler awaits `aensure()` and reads `get_vars()` (`/`) and on the
same handler without the two calls (`/bare`, the baseline), in one run.

The load is a forked child with a fixed number of keep-alive connections, each
sending its next request as soon as the last one is answered (so at most that
many requests are in flight), for a fixed time per sample; the two routes'
samples alternate over the same connections, so a slow spell of the machine
falls on both."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from .channels import in_child, wait_until
from .harness import Bench

ROOT = Path(__file__).resolve().parents[2]
CONNECTIONS = 8
SAMPLE_SECONDS = (0.5, 1.0)  # --quick, the full run
ROUTES = (("/bare", "baseline", "baseline: /bare, the handler without bgpool calls"),
          ("/", "bgpool", "bgpool /: await aensure() + get_vars()"))  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _served(port: int) -> Iterator[None]:
    """The app on `port`, its pool beside it, for a block (stopped with SIGTERM,
    as a user would, killed if that does not end it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [sys.executable, "-m", "fixtures.asgiapp.serve", "--",
         sys.executable, "-m", "uvicorn", "fixtures.asgiapp.app:app", "--workers", "2",
         "--port", str(port), "--log-level", "warning", "--no-access-log"],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
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


def _load(port: int, rounds: int, seconds: float) -> dict[str, list[float]]:
    """Runs in a forked child: per route, the requests per second of each
    sample, `rounds` rounds of one sample per route (in turn first), over the
    same connections."""

    async def main() -> dict[str, list[float]]:
        connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CONNECTIONS)]
        samples: dict[str, list[float]] = {path: [] for path, _, _ in ROUTES}
        try:
            for turn in range(rounds):
                for path, _, _ in ROUTES if turn % 2 else ROUTES[::-1]:
                    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
                    t0 = time.monotonic()
                    counts = await asyncio.gather(
                        *(_requests(c, request, t0 + seconds) for c in connections)
                    )
                    samples[path].append(sum(counts) / (time.monotonic() - t0))
        finally:
            for _, writer in connections:
                writer.close()
        return samples

    return asyncio.run(main())


def asgi_requests(bench: Bench) -> None:
    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        bench.skip("asgi_requests", f"{', '.join(missing)} not installed (the bench extra)")
        return
    seconds = SAMPLE_SECONDS[0 if bench.config.quick else 1]
    port = _free_port()
    with _served(port):
        in_child(_load, port, 1, seconds)  # a warm-up round
        samples = in_child(_load, port, bench.config.reps, seconds)
    params = {"connections": CONNECTIONS, "seconds_per_sample": seconds, "server_processes": 2}
    for path, kind, subject in ROUTES:
        bench.add("asgi_requests", subject, kind, samples[path], params)
