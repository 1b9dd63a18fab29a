"""``bgpool run CONFIG.py`` (run as ``python -m bgpool run``): prints states, restarts
workers on SIGHUP, drains on SIGTERM/SIGINT, fails loudly when start-up fails.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from helpers import ROOT, BgpoolRun, alive, gone, starts, subprocess_env, wait_for

from bgpool.cli.wakeup import signal_wakeup

StartRun = Callable[..., BgpoolRun]
"""The ``cli`` fixture: ``cli(config=..., unbuffered=True)`` starts a ``bgpool run``."""


@pytest.fixture
def cli(sentinel_dir: Path) -> Iterator[StartRun]:
    runs: list[BgpoolRun] = []

    def start(config: str = "fixtures/cli_config.py", unbuffered: bool = True) -> BgpoolRun:
        run = BgpoolRun(config, sentinel_dir, unbuffered=unbuffered)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.close()


def _eager_pids(sentinel_dir: Path) -> list[int]:
    return [pid for pid, _ in starts(sentinel_dir / "eager.starts")]


def test_run_prints_state_changes_as_they_happen(cli: StartRun, sentinel_dir: Path) -> None:
    run = cli(unbuffered=False)  # the CLI itself must flush each line
    run.wait_line("cli-eager", "ready")
    assert run.proc.poll() is None
    n = len(run.lines())
    run.proc.send_signal(signal.SIGHUP)
    run.wait_line("cli-eager", after=n)  # the restart is reported too
    assert run.stop() == 0


def test_sighup_restarts_workers_with_new_pids(cli: StartRun, sentinel_dir: Path) -> None:
    run = cli()
    run.wait_line("cli-eager", "ready")
    (old,) = _eager_pids(sentinel_dir)
    assert alive(old)
    run.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(_eager_pids(sentinel_dir)) == 2, timeout=10, what="respawn after SIGHUP")
    new = _eager_pids(sentinel_dir)[1]
    assert new != old
    wait_for(lambda: gone(old), timeout=5, what="old worker gone")
    assert alive(new)
    assert starts(sentinel_dir / "lazy.starts") == []  # never ensured: stays unstarted
    assert run.proc.poll() is None  # SIGHUP does not stop the CLI
    assert run.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_and_exits_zero(cli: StartRun, sentinel_dir: Path, sig: int) -> None:
    run = cli()
    run.wait_line("cli-eager", "ready")
    (pid,) = _eager_pids(sentinel_dir)
    tree = [p.pid for p in psutil.Process(run.proc.pid).children(recursive=True)]
    assert pid in tree
    t0 = time.monotonic()
    assert run.stop(sig) == 0, run.stderr()
    assert time.monotonic() - t0 < 5.0  # drained, not force-killed after grace_period
    assert all(gone(p) for p in tree)
    assert "Traceback" not in run.stderr()


def test_a_signal_ignored_at_start_stays_ignored(cli: StartRun, sentinel_dir: Path) -> None:
    """Started as a non-interactive shell starts an `&` job (SIGINT ignored),
    `bgpool run` does not drain on SIGINT; SIGHUP and SIGTERM work as ever."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # what the child inherits
    try:
        run = cli()
    finally:
        signal.signal(signal.SIGINT, previous)
    run.wait_line("cli-eager", "ready")
    run.proc.send_signal(signal.SIGINT)  # ignored: dropped by the kernel at once
    n = len(run.lines())
    run.proc.send_signal(signal.SIGHUP)  # handled after it: so not a drain
    run.wait_line("SIGHUP: loading the config file again", after=n)
    assert "stopping" not in "\n".join(run.lines()), run.lines()
    assert run.stop(signal.SIGTERM) == 0, run.stderr()


def test_bad_config_exits_nonzero_with_traceback(cli: StartRun) -> None:
    run = cli("fixtures/bad_config.py")
    code = run.wait(20)
    assert code != 0
    text = "\n".join(run.lines()) + run.stderr()
    assert "Traceback" in text
    assert "bad_config raises on import on purpose" in text
    assert "bad_config.py" in text


def test_startup_failure_exits_nonzero_with_diagnostics(cli: StartRun) -> None:
    run = cli("fixtures/cli_crash_config.py")
    code = run.wait(30)
    assert code != 0
    text = "\n".join(run.lines()) + run.stderr()
    assert "cli-crasher" in text
    assert "RuntimeError: boom" in text
    assert "workers.py" in text


def test_missing_config_file_exits_nonzero(cli: StartRun) -> None:
    run = cli("fixtures/no_such_config.py")
    code = run.wait(20)
    assert code != 0
    assert "no_such_config.py" in "\n".join(run.lines()) + run.stderr()


def test_run_shows_pool_members_catch_all_names_and_scopes(cli: StartRun) -> None:
    """`bgpool run`'s display covers every instance: each member of a
    pool, each catch-all name (when hosted) and the scope of each."""
    run = cli("fixtures/run_display_config.py")
    run.wait_line("pool.0", "ready")
    run.wait_line("pool.1", "ready")
    run.wait_line("api:svc.0", "ready")
    address = run.address()
    ensure = subprocess.run(
        [sys.executable, "-m", "bgpool", "ensure", "tenant-7", "--scope", "api",
         "--address", address],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert ensure.returncode == 0, ensure.stderr
    run.wait_line("api:tenant-7.0", "starting")
    run.wait_line("api:tenant-7.0", "ready")
    assert run.stop() == 0


def test_a_signal_wakes_a_select_on_the_wakeup_pipe_and_the_pipe_is_released() -> None:
    # `bgpool logs -f` and `bgpool run` wait in a select: a signal that comes
    # just before it must still wake it, through the C handler's write
    def wakeup_fd() -> int:
        fd = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(fd, warn_on_full_buffer=False)
        return fd

    before = wakeup_fd()
    caught: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, _frame: caught.append(signum))
    try:
        with signal_wakeup() as (wake_r, wake_w):
            assert wakeup_fd() == wake_w
            signal.raise_signal(signal.SIGUSR1)
            readable, _, _ = select.select([wake_r], [], [], 5.0)
            assert readable == [wake_r]
            assert os.read(wake_r, 64) == bytes([signal.SIGUSR1])
        assert caught == [signal.SIGUSR1]
        assert wakeup_fd() == before
        for fd in (wake_r, wake_w):
            with pytest.raises(OSError):
                os.fstat(fd)
    finally:
        signal.signal(signal.SIGUSR1, previous)
