"""Worker logs (SPEC "Operating a pool", Logs): ``logs()`` and ``follow_logs()`` on
``Pool`` and ``connect()`` clients, and ``bgpool logs NAME [-n N] [-f]``.

Workers print through the supervisor's relay; the test reads what it kept. The
``obs_echo`` worker prints a line whenever the test writes one to its FIFO, so a
line can be made to appear at a chosen moment.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, spec, stuck, subprocess_env, wait_for
from test_cli_commands import cli

import bgpool
from bgpool.declarations import MAX_LOG_LINES
from bgpool.supervisor import logs as supervisor_logs

LOG_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) (\S+)\.(\d+) (stdout|stderr) \| (.*)$"
)
"""A line as ``bgpool logs`` prints it: local time, label, stream, text."""


def chatty(name: str, sentinel_dir: Path, lines: int, **kwargs: Any) -> bgpool.WorkerSpec:
    """A worker that prints ``attempt 1 line <i>`` ``lines`` times, then takes its
    handle and prints ``attempt 1 ready``."""
    env = {"LINES": str(lines), "FAILS": "0", "STARTS": str(sentinel_dir / f"{name}.starts")}
    return spec(name, "obs_chatty", env=env, **kwargs)


def echo(name: str, fifo: Path, **kwargs: Any) -> bgpool.WorkerSpec:
    """A worker that prints ``echo ready <instance>``, then each line written to
    ``fifo``."""
    if not fifo.exists():
        os.mkfifo(fifo)
    return spec(name, "obs_echo", env={"FIFO": str(fifo)}, **kwargs)


def say(fifo: Path, *lines: str) -> None:
    """Make the ``obs_echo`` worker reading ``fifo`` print ``lines``."""
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # the worker holds it open
    try:
        os.write(fd, "".join(f"{line}\n" for line in lines).encode())
    finally:
        os.close(fd)


def texts_of(pool: Any, name: str, lines: int = 100) -> list[str]:
    return [line.line for line in pool.logs(name, lines)]


# ------------------------------------------------------------------- logs()


def test_logs_returns_lines_with_time_stream_and_instance(
    make_pool: Callable[..., Any], sentinel_dir: Path
) -> None:
    fifo = sentinel_dir / "echo.fifo"
    before = datetime.now(UTC)
    pool = make_pool([echo("echo", fifo, num=2)])
    wait_for(lambda: len(pool.logs("echo")) == 2, timeout=10, what="both instances' first line")
    assert sorted(line.line for line in pool.logs("echo")) == ["echo ready 0", "echo ready 1"]
    say(fifo, "to stdout", "err to stderr")  # whichever instance reads them
    wait_for(lambda: len(pool.logs("echo")) == 4, timeout=10, what="the two lines said")
    after = datetime.now(UTC)
    found = pool.logs("echo")
    assert all(isinstance(line, bgpool.LogLine) for line in found)
    assert all(before <= line.time <= after for line in found), found
    assert [line.time for line in found] == sorted(line.time for line in found)
    said = {line.line: line for line in found[2:]}
    assert said["to stdout"].stream == "stdout"
    assert said["err to stderr"].stream == "stderr"
    assert said["to stdout"].instance in (0, 1)
    firsts = {line.line: line.instance for line in found[:2]}
    assert firsts == {"echo ready 0": 0, "echo ready 1": 1}
    assert all(line.stream == "stdout" for line in found[:2])
    # lines=N: the newest N, oldest first; a connect() client sees the same
    assert pool.logs("echo", 2) == found[2:]
    with bgpool.connect(pool.address) as client:
        assert client.logs("echo", 3) == found[1:]
        assert client.logs("echo", 0) == []
    # the JSON form of a line, as `bgpool logs` users script it
    data = found[2].model_dump(mode="json")
    assert set(data) == {"time", "stream", "instance", "line"}


def test_logs_keep_only_the_last_log_lines_of_each_name(
    make_pool: Callable[..., Any], sentinel_dir: Path
) -> None:
    pool = make_pool([chatty("chatty", sentinel_dir, 30, num=1)], log_lines=5)
    wait_for(
        lambda: texts_of(pool, "chatty")[-1:] == ["attempt 1 ready"],
        timeout=10,
        what="the worker's last line",
    )
    assert texts_of(pool, "chatty") == [
        *(f"attempt 1 line {i}" for i in range(26, 30)),
        "attempt 1 ready",
    ]
    assert texts_of(pool, "chatty", 1000) == texts_of(pool, "chatty")


def test_logs_answer_in_several_frames_and_cut_long_lines(
    make_pool: Callable[..., Any], sentinel_dir: Path
) -> None:
    count = 3 * supervisor_logs.BATCH + 7
    fifo = sentinel_dir / "long.fifo"
    pool = make_pool([chatty("many", sentinel_dir, count, num=1), echo("long", fifo, num=1)])
    wait_for(
        lambda: texts_of(pool, "many")[-1:] == ["attempt 1 ready"],
        timeout=10,
        what="the worker's last line",
    )
    assert texts_of(pool, "many", 10_000) == [
        *(f"attempt 1 line {i}" for i in range(count)),
        "attempt 1 ready",
    ]
    wait_for(lambda: pool.logs("long"), timeout=10, what="the echo worker's first line")
    say(fifo, "é" * 5000)
    wait_for(lambda: len(pool.logs("long")) == 2, timeout=10, what="the long line")
    kept = pool.logs("long", 1)[0].line
    assert kept == "é" * supervisor_logs.LINE_CHARS + "... [3000 more characters]"


def test_logs_of_an_undeclared_name_and_bad_arguments(make_pool: Callable[..., Any]) -> None:
    pool = make_pool([spec("idle", "idle", num=1), spec("quiet", "idle", output="inherit")])
    with pytest.raises(
        bgpool.WorkerNotDeclared, match='no background worker configured for name "nope"'
    ):
        pool.logs("nope")
    assert pool.logs("quiet") == []  # declared, never started, not relayed anyway
    with pytest.raises(ValueError, match="lines must be >= 0"):
        pool.logs("idle", -1)
    for bad in ("3", 2.0, True, None):
        with pytest.raises(TypeError, match="lines must be an int"):
            pool.logs("idle", bad)
    with pytest.raises(ValueError, match="worker name"):
        pool.logs("")
    with pytest.raises(TypeError, match="name must be a str"):
        pool.logs(b"idle")


def test_log_lines_is_validated_and_a_live_setting(
    make_pool: Callable[..., Any], sentinel_dir: Path
) -> None:
    for bad in (-1, MAX_LOG_LINES + 1):
        with pytest.raises(ValueError, match="log_lines"):
            bgpool.PoolConfig(workers=[], log_lines=bad)
    workers = [chatty("chatty", sentinel_dir, 30, num=1), spec("idle", "idle", num=1)]
    pool = make_pool(workers)
    wait_for(
        lambda: texts_of(pool, "chatty")[-1:] == ["attempt 1 ready"],
        timeout=10,
        what="the worker's last line",
    )
    assert len(pool.logs("chatty")) == 31
    report = pool.reload(pool.config.model_copy(update={"log_lines": 3, "workers": workers[:1]}))
    assert report.unchanged == ["chatty"] and report.removed == ["idle"]
    assert texts_of(pool, "chatty") == [
        "attempt 1 line 28",
        "attempt 1 line 29",
        "attempt 1 ready",
    ]
    with pytest.raises(bgpool.WorkerNotDeclared, match='name "idle"'):
        pool.logs("idle")  # removed by the reload


# ------------------------------------------------------------- follow_logs()


def test_a_slow_follower_gets_lines_dropped_and_counted(
    make_pool: Callable[..., Any], sentinel_dir: Path
) -> None:
    total = 50_000 + 1  # far more than the follower's backlog holds, unread
    pool = make_pool([chatty("flood", sentinel_dir, total - 1)])
    with pool.follow_logs("flood") as following:
        pool.ensure("flood")
        wait_for(
            lambda: texts_of(pool, "flood", 1) == ["attempt 1 ready"],
            timeout=20,
            what="every line relayed",
        )
        received: list[bgpool.LogLine] = []

        def everything_told() -> bool:
            select.select([following], [], [], 0.5)
            while found := following.lines():
                received.extend(found)
            return bool(len(received) + following.dropped == total)

        wait_for(everything_told, timeout=20, what="every line received or counted as dropped")
    assert following.dropped > 0
    assert len(received) < total
    numbers = [int(line.line.split()[-1]) for line in received if "line" in line.line]
    assert numbers == sorted(numbers), "lines came out of order"
    assert len(pool.logs("flood", 10_000)) == 1000  # the ring: log_lines' default


# ----------------------------------------------------------------- bgpool logs


def test_cli_logs_prints_the_last_n_lines(
    make_pool: Callable[..., Any], sentinel_dir: Path
) -> None:
    pool = make_pool([chatty("chatty", sentinel_dir, 30, num=1)])
    wait_for(
        lambda: texts_of(pool, "chatty")[-1:] == ["attempt 1 ready"],
        timeout=10,
        what="the worker's last line",
    )
    proc = cli("logs", "chatty", "-n", "2", "--address", pool.address)
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.splitlines()
    assert len(printed) == 2, proc.stdout
    matches = [LOG_LINE.match(line) for line in printed]
    assert all(matches), printed
    assert [m.groups()[1:] for m in matches if m] == [
        ("chatty", "0", "stdout", "attempt 1 line 29"),
        ("chatty", "0", "stdout", "attempt 1 ready"),
    ]
    kept = pool.logs("chatty", 2)
    local = kept[0].time.astimezone().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    assert matches[0] is not None and matches[0].group(1) == local
    assert len(cli("logs", "chatty", "--address", pool.address).stdout.splitlines()) == 31

    proc = cli("logs", "nope", "--address", pool.address)
    assert proc.returncode == 1
    assert 'no background worker configured for name "nope"' in proc.stderr


class Follower:
    """``bgpool logs NAME -f`` in a subprocess, its stdout read as it comes."""

    def __init__(self, address: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bgpool", "logs", *args, "-f", "--address", address],
            cwd=ROOT,
            env=subprocess_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.out = b""

    def wait_line(self, text: str, timeout: float = 15.0) -> str:
        """The first printed line ending with ``text``, once it is printed."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            for line in self.out.decode().splitlines():
                if line.endswith(text):
                    return line
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(left, 0))
            chunk = os.read(self.proc.stdout.fileno(), 65536) if ready else b""
            if not chunk:
                raise AssertionError(f"no line ending with {text!r} in {self.out!r}")
            self.out += chunk

    def finish(self, timeout: float = 15.0) -> tuple[int, str]:
        """Its exit status and stderr, once it has exited."""
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"bgpool logs -f has not ended: {stuck(self.proc.pid)}") from None
        return self.proc.returncode, err.decode()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


@pytest.fixture
def followers() -> Iterator[Callable[..., Follower]]:
    made: list[Follower] = []

    def start(address: str, *args: str) -> Follower:
        made.append(Follower(address, *args))
        return made[-1]

    yield start
    for follower in made:
        follower.close()


def test_cli_logs_follow_streams_new_lines_until_ctrl_c(
    make_pool: Callable[..., Any], sentinel_dir: Path, followers: Callable[..., Follower]
) -> None:
    fifo = sentinel_dir / "echo.fifo"
    pool = make_pool([echo("echo", fifo, num=1)])
    wait_for(lambda: pool.logs("echo"), timeout=10, what="the worker's first line")
    follower = followers(pool.address, "echo", "-n", "1")
    assert LOG_LINE.match(follower.wait_line("echo.0 stdout | echo ready 0"))
    say(fifo, "printed after bgpool logs started", "err and this one to stderr")
    assert LOG_LINE.match(follower.wait_line("echo.0 stdout | printed after bgpool logs started"))
    follower.wait_line("echo.0 stderr | err and this one to stderr")
    follower.proc.send_signal(signal.SIGINT)
    status, err = follower.finish()
    assert (status, err) == (0, "")


def test_cli_logs_follow_ends_when_the_pool_closes(
    make_pool: Callable[..., Any], sentinel_dir: Path, followers: Callable[..., Follower]
) -> None:
    fifo = sentinel_dir / "echo.fifo"
    pool = make_pool([echo("echo", fifo, num=1)])
    wait_for(lambda: pool.logs("echo"), timeout=10, what="the worker's first line")
    follower = followers(pool.address, "echo")  # -n 100 by default: the line so far
    follower.wait_line("echo.0 stdout | echo ready 0")
    pool.shutdown()
    status, err = follower.finish()
    assert status == 0, err
    assert err == "bgpool: the pool closed\n"
