"""``bgpool run CONFIG.py`` (run as ``python -m bgpool run``): prints states, restarts
workers on SIGHUP, drains on SIGTERM/SIGINT, fails loudly when start-up fails.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import ROOT, alive, gone, starts, subprocess_env, wait_for


class CliRun:
    """A ``bgpool run`` subprocess whose stdout is collected line by line."""

    def __init__(self, config: str, sentinel_dir: Path, unbuffered: bool = True) -> None:
        extra = {"BGPOOL_TEST_DIR": str(sentinel_dir)}
        if unbuffered:
            extra["PYTHONUNBUFFERED"] = "1"
        env = subprocess_env(**extra)
        env.pop("BGPOOL_ADDRESS", None)
        if not unbuffered:
            env.pop("PYTHONUNBUFFERED", None)
        self.stderr_path = sentinel_dir / "cli.stderr"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bgpool", "run", config],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def output(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def wait_line(self, *words: str, timeout: float = 15.0, after: int = 0) -> str:
        def find() -> str | None:
            for line in self.output()[after:]:
                if all(w in line for w in words):
                    return line
            return None

        try:
            return wait_for(find, timeout=timeout, what=f"a line with {words}")
        except AssertionError:
            raise AssertionError(
                f"no line with {words}; stdout so far: {self.output()!r}; stderr: {self.stderr()!r}"
            ) from None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            # failure path: kill the whole tree so the next tests start clean
            try:
                tree = psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.Error:
                tree = []
            self.proc.kill()
            for p in tree:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            self.proc.wait(10)
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self._stderr.close()


@pytest.fixture
def cli(sentinel_dir: Path) -> Iterator[Any]:
    runs: list[CliRun] = []

    def start(config: str = "fixtures/cli_config.py", unbuffered: bool = True) -> CliRun:
        run = CliRun(config, sentinel_dir, unbuffered=unbuffered)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.close()


def _eager_pids(sentinel_dir: Path) -> list[int]:
    return [pid for pid, _ in starts(sentinel_dir / "eager.starts")]


def test_run_prints_state_changes_as_they_happen(cli: Any, sentinel_dir: Path) -> None:
    run = cli(unbuffered=False)  # the CLI itself must flush each line
    run.wait_line("cli-eager", "ready")
    assert run.proc.poll() is None
    n = len(run.output())
    run.proc.send_signal(signal.SIGHUP)
    run.wait_line("cli-eager", after=n)  # the restart is reported too
    assert run.stop() == 0


def test_sighup_restarts_workers_with_new_pids(cli: Any, sentinel_dir: Path) -> None:
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
def test_signal_drains_and_exits_zero(cli: Any, sentinel_dir: Path, sig: int) -> None:
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


def test_bad_config_exits_nonzero_with_traceback(cli: Any) -> None:
    run = cli("fixtures/bad_config.py")
    code = run.proc.wait(20)
    run.close()
    assert code != 0
    text = "\n".join(run.output()) + run.stderr()
    assert "Traceback" in text
    assert "bad_config raises on import on purpose" in text
    assert "bad_config.py" in text


def test_startup_failure_exits_nonzero_with_diagnostics(cli: Any) -> None:
    run = cli("fixtures/cli_crash_config.py")
    code = run.proc.wait(30)
    run.close()
    assert code != 0
    text = "\n".join(run.output()) + run.stderr()
    assert "cli-crasher" in text
    assert "RuntimeError: boom" in text
    assert "workers.py" in text


def test_missing_config_file_exits_nonzero(cli: Any) -> None:
    run = cli("fixtures/no_such_config.py")
    code = run.proc.wait(20)
    run.close()
    assert code != 0
    assert "no_such_config.py" in "\n".join(run.output()) + run.stderr()


def test_run_shows_pool_members_catch_all_names_and_scopes(cli: Any) -> None:
    """`bgpool run`'s display covers every instance: each member of a
    pool, each catch-all name (when hosted) and the scope of each."""
    run = cli("fixtures/run_display_config.py")
    run.wait_line("pool.0", "ready")
    run.wait_line("pool.1", "ready")
    run.wait_line("api:svc.0", "ready")
    address = run.wait_line("BGPOOL_ADDRESS=").split("BGPOOL_ADDRESS=", 1)[1].split(",")[0]
    ensure = subprocess.run(
        [sys.executable, "-m", "bgpool", "ensure", "tenant-7", "--scope", "api",
         "--address", address],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert ensure.returncode == 0, ensure.stderr
    run.wait_line("api:tenant-7.0", "starting")
    run.wait_line("api:tenant-7.0", "ready")
    assert run.stop() == 0
