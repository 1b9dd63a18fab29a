"""``bgpool run CONFIG -- COMMAND``: COMMAND runs beside the pool, gets the signals
``bgpool run`` receives, and its exit drains the pool and gives ``bgpool run`` its
status; orphans are reaped. Also the rest of ``bgpool run``'s command line: a second
signal skips the grace period, options checked before anything starts, config
errors, ``--version``, one log line per transition.

COMMAND is ``fixtures/command.py``; every run is a real ``bgpool run`` subprocess.
"""

from __future__ import annotations

import importlib.metadata
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import (
    ROOT,
    BgpoolRun,
    StartRun,
    gone,
    read_json,
    read_text,
    starts,
    subprocess_env,
    wait_all_gone,
    wait_for,
    zombie_children,
)

COMMAND = [sys.executable, "fixtures/command.py"]


def with_command(sentinel_dir: Path, mode: str, *args: str) -> list[str]:
    """``bgpool run`` arguments that run ``fixtures/command.py MODE DIR ARGS``."""
    return ["--", *COMMAND, mode, str(sentinel_dir), *args]


def command_info(sentinel_dir: Path) -> dict[str, object]:
    """What COMMAND wrote first: its pid, parent and environment."""
    path = sentinel_dir / "command.json"
    wait_for(path.exists, timeout=20, what="COMMAND started")
    info: dict[str, object] = read_json(path)
    return info


def received(sentinel_dir: Path) -> list[str]:
    return (read_text(sentinel_dir / "signals") or "").split()


def eager_pids(sentinel_dir: Path, name: str = "eager.starts") -> list[int]:
    return [pid for pid, _ in starts(sentinel_dir / name)]


# ----------------------------------------------------------------- COMMAND


def test_signals_reach_command_and_its_exit_status_is_passed_through(
    bgpool_run: StartRun, sentinel_dir: Path
) -> None:
    run = bgpool_run("fixtures/cli_config.py", *with_command(sentinel_dir, "signals"))
    wait_for((sentinel_dir / "signals.ready").exists, timeout=20, what="COMMAND's handlers")
    info = command_info(sentinel_dir)
    assert info["ppid"] == run.proc.pid
    (worker,) = eager_pids(sentinel_dir)
    for n, sig in enumerate((signal.SIGHUP, signal.SIGINT, signal.SIGUSR1), 1):
        run.proc.send_signal(sig)
        wait_for(lambda n=n: len(received(sentinel_dir)) == n, timeout=10, what=sig.name)  # type: ignore[misc]
    assert received(sentinel_dir) == ["SIGHUP", "SIGINT", "SIGUSR1"]  # each once
    # SIGHUP reloaded the pool as well (a restart on new code: a new eager pid);
    # SIGINT did not drain it: COMMAND decides, and it is still running
    wait_for(lambda: len(eager_pids(sentinel_dir)) == 2, timeout=15, what="the reload's restart")
    assert run.proc.poll() is None
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(20) == 5, run.stderr()  # COMMAND's own status
    assert received(sentinel_dir) == ["SIGHUP", "SIGINT", "SIGUSR1", "SIGTERM"]
    assert gone(worker) and all(gone(p) for p in eager_pids(sentinel_dir))
    assert "python ended (exit status 5); stopping the pool" in run.text()


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (("exit", "0"), 0),
        (("exit", "3"), 3),
        (("kill", "SIGKILL"), 137),
        (("kill", "SIGTERM"), 143),
    ],
    ids=["exit-0", "exit-3", "killed-by-SIGKILL", "killed-by-SIGTERM"],
)
def test_command_exit_drains_the_pool_and_sets_the_status(
    bgpool_run: StartRun, sentinel_dir: Path, args: tuple[str, ...], status: int
) -> None:
    run = bgpool_run("fixtures/cli_config.py", *with_command(sentinel_dir, *args))
    assert run.wait(30) == status, run.stderr()
    (worker,) = eager_pids(sentinel_dir)
    assert gone(worker)
    assert run.text().rstrip().endswith("bgpool: stopped")


def test_command_reaches_the_pool_through_bgpool_address(
    bgpool_run: StartRun, sentinel_dir: Path
) -> None:
    run = bgpool_run("fixtures/cli_config.py", *with_command(sentinel_dir, "ensure", "cli-lazy"))
    assert run.wait(30) == 0, run.stderr()
    assert read_text(sentinel_dir / "ensured") == "ready"
    assert len(eager_pids(sentinel_dir, "lazy.starts")) == 1  # started by COMMAND's ensure()
    assert command_info(sentinel_dir)["env"]["BGPOOL_ADDRESS"] == run.address()  # type: ignore[index]


def test_command_never_runs_when_the_pool_cannot_start(
    bgpool_run: StartRun, sentinel_dir: Path
) -> None:
    run = bgpool_run("fixtures/cli_crash_config.py", *with_command(sentinel_dir, "exit", "0"))
    assert run.wait(40) == 1
    assert "StartupError" in run.stderr() and "cli-crasher" in run.stderr()
    assert not (sentinel_dir / "command.json").exists()


def test_a_command_that_cannot_be_found_exits_127(bgpool_run: StartRun, sentinel_dir: Path) -> None:
    run = bgpool_run("fixtures/cli_config.py", "--", "/nonexistent/command")
    assert run.wait(30) == 127
    assert "bgpool: cannot run /nonexistent/command: No such file or directory" in run.stderr()
    assert all(gone(p) for p in eager_pids(sentinel_dir))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_start_up_stops_the_pool_and_command_never_runs(
    bgpool_run: StartRun, sentinel_dir: Path, sig: signal.Signals
) -> None:
    run = bgpool_run("fixtures/slow_start_config.py", *with_command(sentinel_dir, "exit", "0"))
    (worker,) = wait_for(
        lambda: eager_pids(sentinel_dir, "slow.starts"), timeout=20, what="the eager worker spawned"
    )
    run.proc.send_signal(sig)
    assert run.wait(15) == 0, run.stderr()
    run.wait_line(f"bgpool: {sig.name} during start-up: stopped")
    assert gone(worker)
    assert not (sentinel_dir / "command.json").exists()
    assert "Traceback" not in run.stderr()


def test_orphans_of_command_are_reaped(bgpool_run: StartRun, sentinel_dir: Path) -> None:
    run = bgpool_run("fixtures/cli_config.py", *with_command(sentinel_dir, "orphan"))
    orphan = sentinel_dir / "orphan"
    wait_for(orphan.exists, timeout=20, what="the grandchild re-parented")
    pid, new_parent = map(int, (read_text(orphan) or "").split())
    assert new_parent == run.proc.pid  # bgpool run is a child subreaper
    wait_for(lambda: not psutil.pid_exists(pid), timeout=10, what="the orphan reaped")
    assert zombie_children(run.proc.pid) == []
    assert run.stop(signal.SIGTERM) == 0


# ----------------------------------------------- the drain, options, errors


def test_second_sigint_skips_the_grace_period(bgpool_run: StartRun, sentinel_dir: Path) -> None:
    run = bgpool_run("fixtures/stuck_config.py")
    run.wait_line("stuck.0", "ready")
    (worker,) = eager_pids(sentinel_dir, "stuck.starts")
    run.proc.send_signal(signal.SIGINT)
    run.wait_line("stuck.0", "stopping")
    t0 = time.monotonic()
    run.proc.send_signal(signal.SIGINT)
    assert run.wait(15) == 0, run.stderr()
    took = time.monotonic() - t0
    assert took < 10, f"{took:.1f}s: the 30s grace period was not skipped"
    assert gone(worker)
    assert (
        "bgpool: SIGINT during the drain: skipping the rest of the grace period "
        "(SIGTERM to every remaining worker now, SIGKILL 1s later)\n"
    ) in run.stderr()
    run.wait_line("stuck.0", "stopped", "killed by SIGKILL")  # it ignored the SIGTERM


def test_sigterm_during_the_drain_after_command_exited_skips_the_grace_period(
    bgpool_run: StartRun, sentinel_dir: Path
) -> None:
    run = bgpool_run("fixtures/stuck_config.py", *with_command(sentinel_dir, "signals"))
    wait_for((sentinel_dir / "signals.ready").exists, timeout=20, what="COMMAND's handlers")
    run.proc.send_signal(signal.SIGTERM)  # to COMMAND, which exits 5: the drain begins
    run.wait_line("stuck.0", "stopping")
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(15) == 5, run.stderr()
    assert "SIGTERM during the drain: skipping the rest of the grace period" in run.stderr()


def assert_nothing_started(run: BgpoolRun, sentinel_dir: Path) -> None:
    assert not (sentinel_dir / "eager.starts").exists()
    assert "BGPOOL_ADDRESS" not in run.text()


def test_metrics_port_out_of_range_is_refused_before_anything_starts(
    bgpool_run: StartRun, sentinel_dir: Path
) -> None:
    run = bgpool_run("fixtures/cli_config.py", "--metrics-port", "99999")
    assert run.wait(20) == 2
    assert run.stderr() == (
        "bgpool run: --metrics-port 99999: Input should be less than or equal to 65535 "
        "(PoolConfig.metrics_port)\n"
    )
    assert_nothing_started(run, sentinel_dir)


def test_metrics_port_in_use_is_one_line_and_starts_nothing(
    bgpool_run: StartRun, sentinel_dir: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = bgpool_run("fixtures/cli_config.py", "--metrics-port", str(port))
        assert run.wait(20) == 1
    assert run.stderr() == (
        "bgpool: StartupError: could not start the pool: cannot serve metrics on "
        f"127.0.0.1:{port}: [Errno 98] Address already in use\n"
    )
    assert_nothing_started(run, sentinel_dir)


def test_config_load_error_shows_the_users_traceback_without_bgpools_frames(
    bgpool_run: StartRun,
) -> None:
    run = bgpool_run("fixtures/bad_config.py")
    assert run.wait(20) == 2
    assert run.stderr() == (
        "Traceback (most recent call last):\n"
        '  File "fixtures/bad_config.py", line 3, in <module>\n'
        '    raise RuntimeError("bad_config raises on import on purpose")\n'
        "RuntimeError: bad_config raises on import on purpose\n"
        "bgpool: cannot load fixtures/bad_config.py; nothing was started\n"
    )


def test_config_that_exits_is_a_load_error(bgpool_run: StartRun, tmp_path: Path) -> None:
    """sys.exit(0) in the config file: no pool, so not a silent success."""
    config = tmp_path / "exits_config.py"
    config.write_text("import sys\n\nsys.exit(0)\n")
    run = bgpool_run(str(config))
    assert run.wait(20) == 2
    assert run.stderr().endswith(
        f"SystemExit: 0\nbgpool: cannot load {config}; nothing was started\n"
    ), run.stderr()


def test_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bgpool", "--version"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0
    assert done.stdout == f"bgpool {importlib.metadata.version('bgpool')}\n"


def test_info_log_shows_each_transition_once(
    bgpool_run: StartRun, sentinel_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BGPOOL_LOG_LEVEL", "INFO")
    run = bgpool_run("fixtures/cli_config.py")
    run.wait_line("cli-eager.0", "ready")
    (worker,) = eager_pids(sentinel_dir)
    assert run.stop() == 0
    wait_all_gone([worker], 5, "the worker")
    both = run.text() + run.stderr()
    assert both.count("stop pipe closed") == 1, both
    assert "INFO shutting down: asked to stop" in run.stderr()  # the rest of the log stays


def test_a_separator_without_command_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bgpool", "run", "fixtures/cli_config.py", "--"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.endswith("bgpool: error: -- must be followed by a COMMAND to run\n")
    assert "BGPOOL_ADDRESS" not in done.stdout
