"""Observing a pool from outside, for the reliability suite.

Everything here uses the public API, the control protocol as documented (a 4-byte
big-endian length, then a UTF-8 JSON object), psutil and /proc. The only private
attribute used anywhere in the suite is ``pool._process.pid`` (to SIGKILL the
supervisor), through ``supervisor_pid()``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import gone, wait_for

import bgpool

SHM = Path("/dev/shm")
SEGMENT_RE = re.compile(r"^bgp_[0-9a-f]{16}(_v\d+)?$")


# ------------------------------------------------------------------ processes


def supervisor_pid(pool: Any) -> int:
    """The supervisor's pid (``pool._process.pid``: the one private attribute used)."""
    return int(pool._process.pid)


def procs_with_address(address: str) -> list[psutil.Process]:
    """Live (non-zombie) processes other than us whose /proc environ has
    ``BGPOOL_ADDRESS=<address>``: every process of that pool, wherever it went."""
    marker = f"\0BGPOOL_ADDRESS={address}\0".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker not in b"\0" + f.read() + b"\0":
                    continue
            proc = psutil.Process(int(entry))
            if proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def describe(procs: Iterable[psutil.Process]) -> str:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} (ppid {p.ppid()}, {p.status()}): {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            out.append(f"{p.pid} (gone)")
    return "; ".join(out) or "none"


def live(pids: Iterable[int]) -> list[int]:
    return [p for p in pids if not gone(p)]


def wait_all_gone(pids: Iterable[int], timeout: float, what: str) -> float:
    """Wait until every pid is gone (absent or a zombie); return the time it took."""
    pids = list(pids)
    t0 = time.monotonic()
    try:
        wait_for(lambda: not live(pids), timeout=timeout, what=what)
    except AssertionError:
        left = live(pids)
        raise AssertionError(
            f"{what}: still running after {timeout}s: "
            + describe(psutil.Process(p) for p in left if not gone(p))
        ) from None
    return time.monotonic() - t0


def kill_quietly(pids: Iterable[int]) -> None:
    """Failure-path cleanup: SIGKILL whatever is left (the leak check reports it)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, 9)


def zombie_children(pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children() if c.status() == psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return []


def live_children(pid: int) -> set[int]:
    out = set()
    try:
        for c in psutil.Process(pid).children():
            with contextlib.suppress(psutil.Error):
                if c.status() != psutil.STATUS_ZOMBIE:
                    out.add(c.pid)
    except psutil.Error:
        pass
    return out


def notes(directory: Path, prefix: str) -> list[int]:
    """Pids noted by fixtures.hostile (``<prefix>.<pid>`` files in ``$NOTES``)."""
    return sorted(int(p.name.rsplit(".", 1)[1]) for p in directory.glob(f"{prefix}.*"))


# ------------------------------------------------------------ control protocol


def frame(message: Any) -> bytes:
    body = json.dumps(message).encode()
    return struct.pack(">I", len(body)) + body


def raw_connect(address: str, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(address)
    return sock


def read_until_closed(
    sock: socket.socket, timeout: float, stop_on_reply: bool = False
) -> tuple[bytes, bool]:
    """Read until the peer closes or ``timeout`` passes (or, with ``stop_on_reply``,
    a whole reply frame arrived): (bytes read, closed?)."""
    data = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(data), False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return bytes(data), False
        except (ConnectionResetError, BrokenPipeError):
            return bytes(data), True
        if not chunk:
            return bytes(data), True
        data += chunk
        if stop_on_reply and len(data) >= 4 and len(data) >= 4 + struct.unpack(">I", data[:4])[0]:
            return bytes(data), False


def raw_request(address: str, message: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """One well-formed request on a fresh connection; the decoded reply."""
    with raw_connect(address, timeout) as sock:
        sock.sendall(frame(message))
        header = b""
        while len(header) < 4:
            chunk = sock.recv(4 - len(header))
            assert chunk, "the supervisor closed the connection without a reply"
            header += chunk
        (length,) = struct.unpack(">I", header)
        body = b""
        while len(body) < length:
            chunk = sock.recv(length - len(body))
            assert chunk, "truncated reply"
            body += chunk
    reply: dict[str, Any] = json.loads(body)
    return reply


def decode_replies(data: bytes) -> list[Any]:
    """Every complete frame in ``data``, decoded (garbage after them is ignored)."""
    out = []
    while len(data) >= 4:
        (length,) = struct.unpack(">I", data[:4])
        if len(data) < 4 + length:
            break
        out.append(json.loads(data[4 : 4 + length]))
        data = data[4 + length :]
    return out


# ------------------------------------------------------------- pool resources


@dataclass
class Resources:
    """What a running pool owns on the machine: socket, directory, segments."""

    address: str
    directory: Path
    table: str
    supervisor: int
    segments: set[str] = field(default_factory=set)

    def refresh_segments(self) -> set[str]:
        self.segments |= {
            p.name
            for p in SHM.iterdir()
            if p.name == self.table or p.name.startswith(self.table + "_v")
        }
        return self.segments

    def left_behind(self) -> list[str]:
        """What still exists of the pool's resources (empty when all is clean)."""
        self.refresh_segments()
        out = [f"/dev/shm/{s}" for s in sorted(self.segments) if (SHM / s).exists()]
        if os.path.exists(self.address):
            out.append(self.address)
        if self.directory.exists():
            out.append(str(self.directory))
        return out


def resources(pool: Any) -> Resources:
    """The running pool's resources (table name from the documented ``hello`` op);
    ``pool`` is a Pool or client, or the address of a pool another process owns."""
    address = pool if isinstance(pool, str) else pool.address
    hello = raw_request(address, {"op": "hello"})
    assert hello["ok"] is True, hello
    res = Resources(
        address=address,
        directory=Path(address).parent,
        table=str(hello["table"]),
        supervisor=int(hello["pid"]),
    )
    res.refresh_segments()
    assert res.table in res.segments, f"table {res.table} not in /dev/shm"
    return res


def assert_clean(res: Resources) -> None:
    left = res.left_behind()
    assert not left, f"resources left behind: {left}"
    procs = procs_with_address(res.address)
    assert not procs, f"processes of the pool still running: {describe(procs)}"


def shm_entries() -> set[str]:
    return {p.name for p in SHM.iterdir() if p.name.startswith("bgp_")}


def closed_calls(pool: Any, ready_name: str, lazy_name: str) -> dict[str, Callable[[], Any]]:
    """Every public call of a Pool that must raise ``PoolClosed`` once it is closed."""
    return {
        "ensure(ready)": lambda: pool.ensure(ready_name),
        "ensure(lazy)": lambda: pool.ensure(lazy_name, timeout=1),
        "ensure(batch)": lambda: pool.ensure([ready_name, lazy_name], timeout=1),
        "status()": pool.status,
        "diagnostics()": lambda: pool.diagnostics(ready_name),
        "restart_workers()": pool.restart_workers,
        "get_vars()": lambda: pool.get_vars(ready_name),
    }


def assert_pool_closed(pool: Any, ready_name: str, lazy_name: str, text: str) -> None:
    for what, call in closed_calls(pool, ready_name, lazy_name).items():
        with pytest.raises(bgpool.PoolClosed) as info:
            call()
        assert str(info.value) == text, f"{what}: {info.value!r}"


def raises_closed(pool: Any) -> bool:
    try:
        pool.status()
    except bgpool.PoolClosed:
        return True
    return False


# ------------------------------------------------------------------- threads


class Background:
    """Run ``fn`` in a thread; ``result()`` re-raises what it raised."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._fn = fn
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.ended_at = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.value = self._fn()
        except BaseException as exc:
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.done.set()

    def wait(self, timeout: float, what: str) -> None:
        assert self.done.wait(timeout), f"{what} still blocked after {timeout}s"
        self.thread.join()


@contextlib.contextmanager
def reaping(address_of: Callable[[], str | None]) -> Iterator[None]:
    """On failure, SIGKILL whatever still carries the pool's address before the
    error propagates, so one failing case does not spill into the next."""
    try:
        yield
    except BaseException:
        address = address_of()
        if address:
            for proc in procs_with_address(address):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        raise


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))
