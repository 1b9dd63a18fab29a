"""The ``bgpool`` command line against a live pool, driven as a
person would from a second shell: each command is a subprocess, found through
``$BGPOOL_ADDRESS`` (set by the test's ``Pool.start()``) or ``--address``.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, BgpoolRun, gone, http_get, spec, statuses, subprocess_env, wait_for
from test_metrics import refused, scrape

import bgpool

STATUS_COLUMNS = ["WORKER", "SCOPE", "#", "PID", "STATE", "ATTEMPTS", "FAILS", "EXIT", "UPTIME",
                  "READY FOR"]  # fmt: skip
BGPOOL_SCRIPT = Path(sys.executable).parent / "bgpool"


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """``python -m bgpool ARGS`` with the test's environment (so ``BGPOOL_ADDRESS``)."""
    return subprocess.run(
        [sys.executable, "-m", "bgpool", *args],
        cwd=ROOT,
        env=subprocess_env() if env is None else env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def env_without_address() -> dict[str, str]:
    """The test's environment without ``BGPOOL_ADDRESS``, and with a runtime directory
    of the session's own, so that no named pool of this user is found by chance."""
    env = subprocess_env(XDG_RUNTIME_DIR=tempfile.gettempdir())
    env.pop("BGPOOL_ADDRESS", None)
    return env


def none_cell(value: str) -> bool:
    return value in ("", "-")


def parse_table(text: str) -> list[dict[str, str]]:
    """The status table as one dict per row, cut at the header's column starts (the
    table ends at the first blank line: a note may follow)."""
    rows = text.strip("\n").split("\n\n")[0].splitlines()
    assert rows, "empty output"
    header = rows[0]
    assert header.split() == " ".join(STATUS_COLUMNS).split(), header
    starts, offset = [], 0
    for column in STATUS_COLUMNS:
        offset = header.index(column, offset)
        starts.append(offset)
        offset += len(column)
    out = []
    for row in rows[1:]:
        cells = [
            row[start : starts[i + 1] if i + 1 < len(starts) else None].strip()
            for i, start in enumerate(starts)
        ]
        out.append(dict(zip(STATUS_COLUMNS, cells, strict=True)))
    return out


@pytest.fixture
def live_pool(make_pool: Callable[..., Any], sentinel_dir: Path) -> Any:
    """A pool with a bit of everything, some of it in trouble."""
    api = bgpool.next_scope("api")
    pool = make_pool(
        [
            spec("web", "idle", num=2),
            spec("web", "idle", num=1, scope=api),
            spec("mailer", "idle"),
            spec("never", "never_ready"),
            spec("bad", "obs_chatty", max_consecutive_failures=2,
                 env={"LINES": "25", "STARTS": str(sentinel_dir / "bad")}),
            spec("crashy", "crash_at_boot", max_consecutive_failures=2),
            spec(None, "idle"),
        ],
        grace_period=0.5,
        restart_grace_period=2.0,
    )  # fmt: skip
    wait_for(  # start() returns once each eager *name* is ready: wait for every instance
        lambda: all(s.state == "ready" for s in statuses(pool, "web")),
        timeout=10,
        what="every web instance ready",
    )
    return pool


# -------------------------------------------------------------------- --help


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ((), ["run", "status", "ensure", "diagnostics", "restart", "logs"]),
        (
            ("run",),
            ["CONFIG", "--metrics-port PORT", "--metrics-host HOST", "--plain", "--timestamps"],
        ),
        (("status",), ["--json", "--address"]),
        (("ensure",), ["--timeout", "--scope", "--address"]),
        (("diagnostics",), ["--json", "--scope", "--address"]),
        (("restart",), ["--address"]),
        (("logs",), ["--lines", "--follow", "--scope", "--address"]),
    ],
    ids=["bgpool", "run", "status", "ensure", "diagnostics", "restart", "logs"],
)
def test_help(command: tuple[str, ...], options: list[str]) -> None:
    assert BGPOOL_SCRIPT.exists(), "the bgpool console script is not installed"
    for argv in (
        [str(BGPOOL_SCRIPT), *command, "--help"],
        [sys.executable, "-m", "bgpool", *command, "--help"],
    ):
        proc = subprocess.run(
            argv, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=30,
            check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("usage: bgpool" + "".join(f" {c}" for c in command))
        for option in options:
            assert option in proc.stdout, (argv, option)
        assert proc.stderr == ""


@pytest.mark.parametrize(
    "args",
    [
        ("status",),
        ("status", "--json"),
        ("ensure", "web"),
        ("diagnostics", "web"),
        ("restart",),
        ("logs", "web"),
        ("logs", "web", "-f"),
    ],
    ids=lambda a: " ".join(a),
)
def test_without_address_exits_1_saying_so(args: tuple[str, ...]) -> None:
    proc = cli(*args, env=env_without_address())
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "BGPOOL_ADDRESS" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(
    "args", [("status",), ("ensure", "web"), ("restart",), ("logs", "web", "-f")]
)
def test_unreachable_address_exits_1(args: tuple[str, ...], tmp_path: Path) -> None:
    proc = cli(*args, "--address", str(tmp_path / "nothing.sock"), env=env_without_address())
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stderr.strip()
    assert "Traceback" not in proc.stderr


# -------------------------------------------------------------------- status


def test_status_table(live_pool: Any) -> None:
    pool = live_pool
    with pytest.raises(bgpool.WorkerBootFailed):
        pool.ensure("bad", timeout=10)  # aborted after 2 boot failures (exit status 3)
    pool.ensure("tenant-7")  # a catch-all instance, listed under its name
    proc = cli("status")
    assert proc.returncode == 3, proc.stderr  # "bad" was started, and gave up
    rows = parse_table(proc.stdout)
    truth = {(s.name, s.scope, s.instance): s for s in pool.status()}
    assert len(rows) == len(truth), proc.stdout
    seen = set()
    for row in rows:
        scope = "" if none_cell(row["SCOPE"]) else row["SCOPE"]
        key = (row["WORKER"], scope, int(row["#"]))
        assert key in truth, (row, sorted(truth))
        seen.add(key)
        s = truth[key]
        assert row["STATE"] == s.state, row
        assert row["PID"] == str(s.pid) if s.pid else none_cell(row["PID"]), row
        assert row["ATTEMPTS"] == str(s.attempts), row
        assert row["FAILS"] == str(s.consecutive_failures), row
        if s.last_exit_status is None:
            assert none_cell(row["EXIT"]), row
        else:
            assert row["EXIT"] == str(s.last_exit_status), row
        if s.state == "ready":
            assert re.search(r"\d", row["UPTIME"]), row
            assert re.search(r"\d", row["READY FOR"]), row
        if s.pid is None:
            assert none_cell(row["UPTIME"]), row
    assert seen == set(truth)
    by_key = {(r["WORKER"], "" if none_cell(r["SCOPE"]) else r["SCOPE"], r["#"]): r for r in rows}
    assert by_key[("web", "", "0")]["STATE"] == "ready"
    assert by_key[("web", "", "1")]["STATE"] == "ready"
    assert by_key[("web", "api", "0")]["STATE"] == "ready"
    assert by_key[("tenant-7", "", "0")]["STATE"] == "ready"
    bad = by_key[("bad", "", "0")]
    assert (bad["STATE"], bad["ATTEMPTS"], bad["FAILS"], bad["EXIT"]) == ("aborted", "2", "2", "3")


def test_status_json(live_pool: Any) -> None:
    pool = live_pool
    pool.ensure("mailer")
    proc = cli("status", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert isinstance(data, list)
    got = [bgpool.WorkerStatus.model_validate(item) for item in data]
    truth = pool.status()
    assert sorted(s.model_dump_json() for s in got) == sorted(s.model_dump_json() for s in truth)
    keys = {(s.name, s.scope, s.instance) for s in got}
    assert {("web", "", 0), ("web", "", 1), ("web", "api", 0), ("mailer", "", 0)} <= keys


def test_status_with_address_option(live_pool: Any) -> None:
    proc = cli("status", "--json", "--address", live_pool.address, env=env_without_address())
    assert proc.returncode == 0, proc.stderr
    names = {(item["name"], item["scope"]) for item in json.loads(proc.stdout)}
    assert {("web", ""), ("web", "api")} <= names


# -------------------------------------------------------------------- ensure


def test_ensure_starts_lazy_workers_and_exits_0(live_pool: Any) -> None:
    pool = live_pool
    assert statuses(pool, "mailer")[0].pid is None
    proc = cli("ensure", "mailer")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ready: mailer"
    (mailer,) = statuses(pool, "mailer")
    assert mailer.state == "ready" and mailer.pid is not None

    proc = cli("ensure", "mailer", "web", "guest", "--timeout", "5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ready: mailer, web, guest"
    assert [s.state for s in statuses(pool, "guest")] == ["ready"]  # the catch-all

    proc = cli("ensure", "web", "--scope", "api", "--address", pool.address,
               env=env_without_address())  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ready: web"


def test_ensure_in_a_scope_starts_that_scopes_worker(
    make_pool: Callable[..., Any], sentinel_dir: Path
) -> None:
    api = bgpool.next_scope("api")
    pool = make_pool([spec("job", "idle"), spec("job", "idle", scope=api)])
    proc = cli("ensure", "job", "--scope", "api")
    assert proc.returncode == 0, proc.stderr
    states = {s.scope: s.state for s in statuses(pool, "job")}
    assert states == {"": "stopped", "api": "ready"}, states


def test_ensure_timeout_exits_1_with_diagnostics(live_pool: Any) -> None:
    proc = cli("ensure", "never", "--timeout", "0.5")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert 'background worker "never" did not call get_worker_handle() within 0.5s' in proc.stderr
    assert "EnsureTimeout" in proc.stderr
    assert "fixtures.workers:never_ready" in proc.stderr  # the diagnostics follow
    assert "Traceback" not in proc.stderr


def test_ensure_boot_failure_exits_1_with_diagnostics(live_pool: Any) -> None:
    proc = cli("ensure", "crashy", "--timeout", "10")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert 'background worker "crashy" failed to start: 2 consecutive failures' in proc.stderr
    assert "RuntimeError: boom" in proc.stderr
    assert "workers.py" in proc.stderr
    assert "fixtures.workers:crash_at_boot" in proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr  # the worker's, in diagnostics
    assert "bgpool/cli/" not in proc.stderr  # ... not the CLI's own


def test_ensure_undeclared_name_exits_1_and_starts_nothing(
    make_pool: Callable[..., Any],
) -> None:
    pool = make_pool([spec("a", "idle")])
    proc = cli("ensure", "a", "nosuch")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert 'no background worker configured for name "nosuch"' in proc.stderr
    assert "Traceback" not in proc.stderr
    assert statuses(pool, "a")[0].pid is None  # the batch started nothing


@pytest.mark.parametrize("timeout", ["0", "-1", "nan"])
def test_ensure_bad_timeout_is_an_error_not_a_traceback(
    make_pool: Callable[..., Any], timeout: str
) -> None:
    pool = make_pool([spec("a", "idle")])
    proc = cli("ensure", "a", f"--timeout={timeout}")
    assert proc.returncode in (1, 2), (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "timeout" in proc.stderr.lower()
    assert statuses(pool, "a")[0].pid is None


# --------------------------------------------------------------- diagnostics


def test_diagnostics_text_and_json(live_pool: Any) -> None:
    pool = live_pool
    with pytest.raises(bgpool.WorkerBootFailed):
        pool.ensure("bad", timeout=10)

    proc = cli("diagnostics", "bad")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "bad" in text
    assert "fixtures.workers:obs_chatty" in text
    assert "aborted" in text
    for i in range(5, 25):  # the last output lines of the failed run
        assert f"attempt 2 line {i}" in text
    assert "attempt 2 line 4\n" not in text

    proc = cli("diagnostics", "bad", "--json")
    assert proc.returncode == 0, proc.stderr
    got = bgpool.WorkerDiagnostics.model_validate_json(proc.stdout)
    assert got.model_dump(mode="json") == pool.diagnostics("bad").model_dump(mode="json")
    assert got.state == "aborted"
    assert got.last_exit_status == 3
    assert list(got.last_output) == [f"attempt 2 line {i}" for i in range(5, 25)]

    proc = cli("diagnostics", "web", "--scope", "api", "--json")
    assert proc.returncode == 0, proc.stderr
    web = bgpool.WorkerDiagnostics.model_validate_json(proc.stdout)
    assert web.scope == "api"
    assert [(i.scope, i.instance, i.state) for i in web.instances] == [("api", 0, "ready")]
    assert web.instances[0].pid == next(s.pid for s in statuses(pool, "web") if s.scope == "api")

    proc = cli("diagnostics", "web", "--json", "--address", pool.address,
               env=env_without_address())  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    glob = bgpool.WorkerDiagnostics.model_validate_json(proc.stdout)
    assert (glob.scope, len(glob.instances)) == ("", 2)


def test_diagnostics_of_undeclared_name_exits_1(make_pool: Callable[..., Any]) -> None:
    make_pool([spec("a", "idle")])
    proc = cli("diagnostics", "nosuch")
    assert proc.returncode == 1
    assert 'no background worker configured for name "nosuch"' in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------- restart


def test_restart_respawns_running_workers(live_pool: Any) -> None:
    pool = live_pool
    pool.ensure("mailer")
    before = {(s.name, s.scope, s.instance): s.pid for s in pool.status() if s.pid}
    assert len(before) == 4  # web x2, api:web, mailer
    proc = cli("restart")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    after = {(s.name, s.scope, s.instance): s for s in pool.status()}
    for key, old_pid in before.items():
        assert after[key].pid not in (None, old_pid), (key, after[key])
        assert gone(old_pid)
    wait_for(
        lambda: all(s.state == "ready" for s in pool.status() if s.pid),
        timeout=10,
        what="respawned workers ready",
    )
    (never,) = statuses(pool, "never")
    assert never.pid is None and never.attempts == 0  # lazy, never ensured: left alone


# --------------------------------------------------------------- bgpool run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def run(sentinel_dir: Path) -> Iterator[Callable[..., BgpoolRun]]:
    runs: list[BgpoolRun] = []

    def start(*args: str, tty: bool = False) -> BgpoolRun:
        r = BgpoolRun("fixtures/obs_run_config.py", sentinel_dir, *args, tty=tty)
        runs.append(r)
        return r

    yield start
    for r in runs:
        r.close()


def test_run_with_metrics_and_commands_from_a_second_shell(run: Callable[..., BgpoolRun]) -> None:
    port = free_port()
    r = run("--metrics-port", str(port), "--metrics-host", "127.0.0.1")
    r.wait_line("obs-eager.0", "ready")
    address = r.address()
    shell = env_without_address()
    # the worker's output comes through bgpool run's stdout, prefixed
    r.wait_line("obs-eager.0 | hello from obs-eager attempt 1")

    assert http_get(port, "/healthz")[0] == 200
    code, _, body = http_get(port, "/readyz")
    assert (code, json.loads(body)["ok"]) == (200, True)
    assert scrape(port).values("m#:obs-eager")["ready"] == 1

    proc = cli("status", "--address", address, env=shell)
    assert proc.returncode == 0, proc.stderr
    rows = {r_["WORKER"]: r_ for r_ in parse_table(proc.stdout)}
    assert rows["obs-eager"]["STATE"] == "ready"

    n = len(r.lines())
    proc = cli("ensure", "obs-crashy", "--address", address, env=shell)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ready: obs-crashy"
    r.wait_line("obs-crashy.0", "starting", after=n)
    r.wait_line("obs-crashy.0", "crashed", after=n)
    r.wait_line("obs-crashy.0 | hello from obs-crashy attempt 2", after=n)

    def crashed_once() -> bool:
        v = scrape(port).values("m#:obs-crashy")
        return v["crashes"] == 1 and v["restarts"] == 1 and v["ready"] == 1

    wait_for(crashed_once, timeout=10, what="obs-crashy's crash in /metrics")

    proc = cli("diagnostics", "obs-crashy", "--json", "--address", address, env=shell)
    assert proc.returncode == 0, proc.stderr
    diag = bgpool.WorkerDiagnostics.model_validate_json(proc.stdout)
    assert diag.last_error is not None
    assert (diag.last_error.type, diag.last_error.message) == ("RuntimeError", "obs crash")
    assert "hello from obs-crashy attempt 1" in diag.last_output

    old = [s for s in json.loads(cli("status", "--json", "--address", address,
                                     env=shell).stdout) if s["name"] == "obs-eager"]  # fmt: skip
    n = len(r.lines())
    proc = cli("restart", "--address", address, env=shell)
    assert proc.returncode == 0, proc.stderr
    r.wait_line("obs-eager.0", "stopping", after=n)
    r.wait_line("obs-eager.0 | hello from obs-eager attempt 2", after=n)
    assert gone(old[0]["pid"])

    assert r.stop() == 0, r.stderr()
    assert refused(port)
    # the worker's traceback went to run's stderr, prefixed; run itself printed none
    assert "obs-crashy.0 | RuntimeError: obs crash" in r.stderr().splitlines()
    assert not [line for line in r.stderr().splitlines() if line.startswith("Traceback")]


@pytest.mark.parametrize("plain", [False, True], ids=["live", "plain"])
def test_run_on_a_terminal(run: Callable[..., BgpoolRun], plain: bool) -> None:
    r = run(*(["--plain"] if plain else []), tty=True)
    address = r.address()
    r.wait_line("obs-eager", "ready")
    proc = cli("ensure", "obs-crashy", "--address", address, env=env_without_address())
    assert proc.returncode == 0, proc.stderr
    r.wait_line("obs-crashy", "ready")
    text = r.text()
    if plain:
        assert "\x1b[" not in text
        assert re.search(r"^\d\d:\d\d:\d\d obs-eager\.0 +ready\b", text, re.M), text
        r.wait_line("obs-crashy.0", "crashed")
    else:
        # a table (header and a row per instance) redrawn in place with escape codes
        assert "\x1b[" in text

        def shown() -> bool:  # obs-crashy crashes once: wait for it to be ready again
            screen = "\n".join(r.screen())
            return all(
                re.search(pattern, screen)
                for pattern in (
                    r"WORKER +SCOPE +# +PID +STATE",
                    r"obs-eager +\S+ +0 +\d+ +ready",
                    r"obs-crashy +\S+ +0 +\d+ +ready",
                )
            )

        wait_for(shown, timeout=15, what="the table showing both workers ready")
    assert r.stop() == 0, r.stderr()
