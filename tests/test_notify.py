"""``bgpool run`` under a service manager: systemd's notify protocol, checked against
a real AF_UNIX datagram socket bound by the test (what systemd listens on):
``READY=1``, ``STATUS=``, ``RELOADING=1`` with ``MONOTONIC_USEC``, ``STOPPING=1``
and ``WATCHDOG=1`` every half of ``WATCHDOG_USEC`` while the supervisor answers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import (
    ROOT,
    BgpoolRun,
    StartRun,
    raw_request,
    read_json,
    starts,
    subprocess_env,
    wait_for,
)


class Manager:
    """The service manager's end: a datagram socket bound at ``address`` (a path, or
    ``@name`` in the abstract namespace), and every notification read from it, with
    the monotonic time it arrived."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.got: list[tuple[float, str]] = []

    def _read(self, timeout: float) -> None:
        self.sock.settimeout(max(timeout, 0.001))
        with contextlib.suppress(TimeoutError):
            data = self.sock.recv(4096)
            self.got.append((time.monotonic(), data.decode()))

    def wait(self, text: str, after: int = 0, timeout: float = 20.0) -> int:
        """The index of the first notification from ``after`` on that contains
        ``text`` (one of its lines, or lines)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, (_, message) in enumerate(self.got[after:], after):
                if text in message.split("\n") or text in message:
                    return i
            if time.monotonic() > deadline:
                raise AssertionError(f"no notification with {text!r}: {self.got!r}")
            self._read(deadline - time.monotonic())

    def listen(self, seconds: float) -> None:
        """Read whatever comes for ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._read(deadline - time.monotonic())

    def pings_after_listening(self, seconds: float, after: float = 0.0) -> list[float]:
        """``listen(seconds)``, then ``pings(after)``."""
        self.listen(seconds)
        return self.pings(after)

    def pings(self, after: float = 0.0) -> list[float]:
        return [t for t, message in self.got if message == "WATCHDOG=1" and t >= after]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[Manager]:
    """A notify socket in a fresh private directory, ``NOTIFY_SOCKET`` naming it."""
    directory = tempfile.mkdtemp(prefix="notify-")
    manager = Manager(os.path.join(directory, "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", manager.address)
    yield manager
    manager.close()
    shutil.rmtree(directory)


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def command_children(run: BgpoolRun) -> list[psutil.Process]:
    """bgpool run's children running COMMAND. A child's command line reads
    empty for a moment inside its exec (its parent's spawn call has returned,
    the new program's arguments are not set up yet): waited out."""

    def cmdline(child: psutil.Process) -> list[str]:
        return wait_for(child.cmdline, timeout=5, what=f"the command line of {child.pid}")

    return [
        p for p in psutil.Process(run.proc.pid).children() if "fixtures/command.py" in cmdline(p)
    ]


def test_ready_status_reloading_and_stopping(
    bgpool_run: StartRun, manager: Manager, sentinel_dir: Path
) -> None:
    run = bgpool_run(
        "fixtures/cli_config.py",
        "--", sys.executable, "fixtures/command.py", "signals", str(sentinel_dir),
    )  # fmt: skip
    ready = manager.wait("READY=1")
    assert command_children(run), "READY=1 before COMMAND was started"
    assert "STATUS=1/1 workers ready" in manager.got[ready][1]  # the lazy one is not counted
    # nobody below bgpool run may speak for the service
    wait_for((sentinel_dir / "signals.ready").exists, timeout=20, what="COMMAND's handlers")
    assert read_json(sentinel_dir / "command.json")["env"]["NOTIFY_SOCKET"] is None
    ((worker, _),) = starts(sentinel_dir / "eager.starts")
    assert b"NOTIFY_SOCKET=" not in Path(f"/proc/{worker}/environ").read_bytes()

    ensured = subprocess.run(
        [sys.executable, "-m", "bgpool", "ensure", "cli-lazy", "--address", run.address()],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert ensured.returncode == 0, ensured.stderr
    after = manager.wait("STATUS=2/2 workers ready", after=ready)

    before = monotonic_usec()
    run.proc.send_signal(signal.SIGHUP)
    reloading = manager.wait("RELOADING=1", after=after)
    lines = dict(line.split("=", 1) for line in manager.got[reloading][1].split("\n"))
    assert before <= int(lines["MONOTONIC_USEC"]) <= monotonic_usec()
    manager.wait("READY=1", after=reloading + 1)

    run.proc.send_signal(signal.SIGTERM)  # COMMAND exits 5, the drain begins
    manager.wait("STOPPING=1", after=reloading)
    assert run.wait(20) == 5, run.stderr()


def test_abstract_notify_socket(
    bgpool_run: StartRun, monkeypatch: pytest.MonkeyPatch, sentinel_dir: Path
) -> None:
    manager = Manager(f"@bgpool-test-{uuid.uuid4().hex}")
    monkeypatch.setenv("NOTIFY_SOCKET", manager.address)
    try:
        run = bgpool_run("fixtures/cli_config.py")
        manager.wait("READY=1")
        run.proc.send_signal(signal.SIGTERM)
        manager.wait("STOPPING=1")
        assert run.wait(20) == 0
    finally:
        manager.close()


def test_watchdog_pings_while_the_supervisor_answers(
    bgpool_run: StartRun, manager: Manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "600000")  # a ping every 0.3 s
    run = bgpool_run("fixtures/cli_config.py")
    manager.wait("READY=1")
    wait_for(lambda: len(manager.pings_after_listening(0.05)) >= 6, timeout=10, what="six pings")
    gaps = [b - a for a, b in zip(manager.pings(), manager.pings()[1:], strict=False)]
    assert 0.22 <= statistics.median(gaps) <= 0.45, gaps

    supervisor = int(raw_request(run.address(), {"op": "hello"})["pid"])
    os.kill(supervisor, signal.SIGSTOP)
    try:
        manager.listen(0.6)  # a round trip under way when it froze may still answer
        frozen = time.monotonic()
        manager.listen(1.2)
        assert manager.pings(after=frozen) == [], "pinged for a frozen supervisor"
    finally:
        os.kill(supervisor, signal.SIGCONT)
    resumed = time.monotonic()
    wait_for(lambda: manager.pings_after_listening(0.05, resumed), timeout=5, what="pings again")
    assert run.stop() == 0


def test_watchdog_of_another_pid_is_not_ours(
    bgpool_run: StartRun, manager: Manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))  # the test's, not bgpool run's
    run = bgpool_run("fixtures/cli_config.py")
    manager.wait("READY=1")
    manager.listen(0.8)
    assert manager.pings() == []
    assert run.stop() == 0
