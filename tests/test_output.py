"""Worker output and supervisor logs (README, "Worker output" and "Logs").

The application runs as a subprocess (a short Python program that starts a pool):
its stdout and stderr, which the supervisor and the workers inherit, are captured
whole, so the test sees exactly what a terminal or a log collector would.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, read_json, run_python, spec, subprocess_env, wait_for

import bgpool

APP_PRELUDE = """
import json, os, sys, time
import bgpool
from bgpool import Pool, PoolConfig, WorkerSpec, next_scope

D = os.environ["OBS_DIR"]

def spec(name, worker, **kw):
    return WorkerSpec(name=name, target=f"fixtures.workers:{worker}", **kw)

def wait_file(path, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"app: timed out waiting for {path}")
        time.sleep(0.01)

def wait_all_ready(pool, timeout=20.0):
    # start() returns once each eager name is ready: wait for every instance
    deadline = time.monotonic() + timeout
    while not all(s.state == "ready" for s in pool.status()):
        if time.monotonic() > deadline:
            raise SystemExit(f"app: not every instance became ready: {pool.status()}")
        time.sleep(0.01)

def result(data):
    tmp = os.path.join(D, "result.json.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, os.path.join(D, "result.json"))
"""


def app_env(sentinel_dir: Path, **extra: str) -> dict[str, str]:
    env = subprocess_env(OBS_DIR=str(sentinel_dir))
    env.pop("BGPOOL_ADDRESS", None)
    env.pop("BGPOOL_LOG_LEVEL", None)
    env.pop("PYTHONUNBUFFERED", None)
    env.update(extra)
    return env


def run_app(
    body: str, sentinel_dir: Path, timeout: float = 40.0, **extra: str
) -> subprocess.CompletedProcess[str]:
    code = APP_PRELUDE + textwrap.dedent(body)
    proc = run_python(code, env=app_env(sentinel_dir, **extra), timeout=timeout)
    assert proc.returncode == 0, f"app failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def lines(text: str) -> list[str]:
    return text.splitlines()


# ------------------------------------------------------------------ prefixing


def test_output_is_prefixed_per_stream_scope_and_instance(sentinel_dir: Path) -> None:
    proc = run_app(
        """
        api = next_scope("api")
        config = PoolConfig(grace_period=5, ensure_timeout=15, workers=[
            spec("talk", "obs_talker", num=1),
            spec("talk", "obs_talker", num=1, scope=api, env={"TAG": "talk-api"}),
            spec("pair", "obs_talker", num=2),
            spec("raw", "obs_talker", num=1, output="inherit", env={"NO_SPLIT": "1"}),
        ])
        with Pool(config) as pool:
            wait_all_ready(pool)
        """,
        sentinel_dir,
    )
    out, err = lines(proc.stdout), lines(proc.stderr)
    expected_out = [
        "talk.0 | out talk",
        "talk.0 | split talk first-half+second-half",
        "api:talk.0 | out talk-api",
        "api:talk.0 | split talk-api first-half+second-half",
        "pair.0 | out pair",
        "pair.0 | split pair first-half+second-half",
        "pair.1 | out pair",
        "pair.1 | split pair first-half+second-half",
        "out raw",  # output="inherit": the raw stream, unprefixed
    ]
    assert sorted(out) == sorted(expected_out), proc.stdout
    expected_err = {
        "talk.0 | err talk",
        "api:talk.0 | err talk-api",
        "pair.0 | err pair",
        "pair.1 | err pair",
        "err raw",
    }
    assert expected_err <= set(err), proc.stderr
    relayed = [line for line in err if " | " in line or line.startswith(("err ", "out "))]
    assert sorted(relayed) == sorted(expected_err), proc.stderr
    assert not any("raw.0" in line for line in out + err)


def test_long_lines_from_concurrent_writers_are_never_torn(sentinel_dir: Path) -> None:
    count, size, writers = 150, 8000, 3  # lines longer than PIPE_BUF, written at once
    done = sentinel_dir / "done"
    done.mkdir()
    proc = run_app(
        f"""
        config = PoolConfig(grace_period=5, ensure_timeout=15, workers=[
            spec("long", "obs_long_lines", num={writers}, env={{
                "GATE": os.path.join(D, "gate"), "DONE_DIR": os.path.join(D, "done"),
                "COUNT": "{count}", "SIZE": "{size}"}}),
        ])
        with Pool(config) as pool:
            wait_all_ready(pool)
            open(os.path.join(D, "gate"), "w").close()  # every writer is ready: go
            for i in range({writers}):
                wait_file(os.path.join(D, "done", str(i)))
        """,
        sentinel_dir,
    )
    pattern = re.compile(r"long\.(\d) \| L(\d):(\d+):(x*):end")
    seen: dict[int, list[int]] = {i: [] for i in range(writers)}
    for line in lines(proc.stdout):
        m = pattern.fullmatch(line)
        assert m, f"torn or foreign line ({len(line)} bytes): {line[:120]!r}...{line[-60:]!r}"
        assert m.group(1) == m.group(2), line[:40]
        assert len(m.group(4)) == size, line[:40]
        seen[int(m.group(1))].append(int(m.group(3)))
    for i in range(writers):
        assert seen[i] == list(range(count)), f"instance {i}: lines lost or out of order"


# ------------------------------------------------------------ last output lines


def test_diagnostics_keep_the_last_lines_of_the_failed_run(
    make_pool: Callable[..., Any], sentinel_dir: Path
) -> None:
    pool = make_pool(
        [
            spec("chatty", "obs_chatty", max_consecutive_failures=1,
                 env={"LINES": "30", "STARTS": str(sentinel_dir / "chatty")}),
            spec("short", "obs_chatty", max_consecutive_failures=1,
                 env={"LINES": "3", "ERR_LINE": "fatal: no config",
                      "STARTS": str(sentinel_dir / "short")}),
            spec("recovers", "obs_chatty",
                 env={"LINES": "25", "FAILS": "1", "STARTS": str(sentinel_dir / "recovers")}),
        ],
    )  # fmt: skip
    with pytest.raises(bgpool.WorkerBootFailed) as info:
        pool.ensure("chatty", timeout=10)
    tail = [f"attempt 1 line {i}" for i in range(10, 30)]  # the last 20 of 30
    assert list(pool.diagnostics("chatty").last_output) == tail
    assert list(info.value.diagnostics.last_output) == tail
    assert pool.diagnostics("chatty").last_exit_status == 3

    with pytest.raises(bgpool.WorkerBootFailed):
        pool.ensure("short", timeout=10)
    short = list(pool.diagnostics("short").last_output)
    # stdout and stderr both count; their relative order is not defined
    assert sorted(short) == sorted(
        ["attempt 1 line 0", "attempt 1 line 1", "attempt 1 line 2", "fatal: no config"]
    )
    assert short.index("attempt 1 line 0") < short.index("attempt 1 line 2")

    pool.ensure("recovers", timeout=10)  # attempt 1 exits 3, attempt 2 is ready
    wait_for(lambda: pool.diagnostics("recovers").attempts == 2, timeout=5, what="2 attempts")
    assert list(pool.diagnostics("recovers").last_output) == [
        f"attempt 1 line {i}" for i in range(5, 25)
    ]


# ------------------------------------------------------------------- flooding


_FLOOD_APP = """
workers = [
    spec("flood", "obs_flooder", num=1, env={
        "MARK": os.path.join(D, "mark"), "MARK_BYTES": "300000", "FD": os.environ["FLOOD_FD"]}),
    spec("other", "idle"),
    spec("other2", "idle"),
]
loud = os.environ.get("LOUD") == "1"
if loud:
    workers.append(spec("loud", "obs_loud_crash", max_consecutive_failures=2))
config = PoolConfig(grace_period=5, ensure_timeout=15, workers=workers)
with Pool(config) as pool:
    wait_file(os.path.join(D, "mark"))  # the flooder has been writing a while
    times, error = {}, None
    try:
        if loud:  # boot failures make the supervisor log long lines (WARNING, ERROR)
            t0 = time.monotonic()
            try:
                pool.ensure("loud", timeout=5)
            except bgpool.WorkerAborted:
                pass
            times["loud"] = time.monotonic() - t0
        for name in ("other", "other2"):  # each needs the supervisor's loop to fork
            t0 = time.monotonic()
            pool.ensure(name, timeout=5)
            times[name] = time.monotonic() - t0
        t0 = time.monotonic()
        for _ in range(10):  # round trips to the supervisor
            pool.diagnostics("other")
            pool.status()
        times["round_trips"] = time.monotonic() - t0
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    result({"times": times, "error": error})
"""


def _run_flood_app(
    sentinel_dir: Path, stream: str, reader: str, **extra: str
) -> tuple[Any, int, bytes, int, str]:
    """Run ``_FLOOD_APP`` with the flooded stream a pipe the test does not read until
    the app is done ("not-reading": the relay's destination is full) or reads as fast
    as it can ("reading": the relay is busy). Returns the app's result, its exit
    status, the first 64 KiB of the flooded stream, its size and the other stream."""
    other_path = sentinel_dir / "app.other"
    with open(other_path, "wb") as other:
        proc = subprocess.Popen(
            [sys.executable, "-c", APP_PRELUDE + _FLOOD_APP],
            cwd=ROOT,
            env=app_env(sentinel_dir, FLOOD_FD="1" if stream == "stdout" else "2", **extra),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stream == "stdout" else other,
            stderr=subprocess.PIPE if stream == "stderr" else other,
        )
    flooded = proc.stdout if stream == "stdout" else proc.stderr
    assert flooded is not None
    head = bytearray()
    total = [0]

    def read_all() -> None:
        while chunk := os.read(flooded.fileno(), 65536):  # the file object buffers nothing
            total[0] += len(chunk)
            if len(head) < 65536:
                head.extend(chunk)

    reader_thread = threading.Thread(target=read_all, daemon=True)
    try:
        if reader == "reading":
            reader_thread.start()
        with contextlib.suppress(AssertionError):  # judged below, from the result
            wait_for(
                lambda: (sentinel_dir / "result.json").exists() or proc.poll() is not None,
                timeout=15,
                what="the app's measurement",
            )
    finally:
        if not reader_thread.is_alive() and reader == "not-reading":
            reader_thread.start()  # drain now: whatever was stuck on the pipe goes on
        try:
            code = proc.wait(40)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader_thread.join(10)
            flooded.close()
    other_text = other_path.read_text(errors="replace")[-3000:]
    return read_json(sentinel_dir / "result.json"), code, bytes(head), total[0], other_text


def _check_flood_output(head: bytes, total: int) -> None:
    assert total > 300000  # it did flood
    relayed = [
        line
        for line in head.split(b"\n")[:-1]
        if not line.startswith(b"bgpool[")  # the supervisor's log lines share stderr
    ]
    assert re.fullmatch(rb"flood\.0 \| flood 0 f{90}", relayed[0]), relayed[0][:200]
    for line in relayed[1:]:
        assert re.fullmatch(rb"flood\.0 \| flood \d+ f{90}", line), line[:200]


@pytest.mark.parametrize(
    ("stream", "reader"),
    [("stdout", "not-reading"), ("stdout", "reading"), ("stderr", "not-reading")],
)
def test_a_flooding_worker_does_not_slow_ensure(
    sentinel_dir: Path, stream: str, reader: str
) -> None:
    outcome, code, head, total, other = _run_flood_app(sentinel_dir, stream, reader)
    assert isinstance(outcome, dict), f"the app gave no result (status {code}): {other}"
    assert outcome["error"] is None, outcome
    times = outcome["times"]
    assert times["other"] < 2.0, outcome  # cold ensure: generous bound
    assert times["other2"] < 2.0, outcome
    assert times["round_trips"] < 2.0, outcome
    assert code == 0, other
    _check_flood_output(head, total)


def test_supervisor_logging_does_not_block_on_a_flooded_stderr(sentinel_dir: Path) -> None:
    """A worker floods stderr, which nobody reads for now (a stalled log collector);
    another worker fails to boot, so the supervisor logs about it on that stderr:
    the supervisor must go on serving (output never blocks the supervisor)."""
    outcome, code, head, total, other = _run_flood_app(
        sentinel_dir, "stderr", "not-reading", LOUD="1"
    )
    assert isinstance(outcome, dict), f"the app gave no result (status {code}): {other}"
    times = outcome["times"]
    assert outcome["error"] is None, outcome
    assert times["loud"] < 2.0, outcome  # two boot failures, 0.1 s apart
    assert times["other"] < 2.0, outcome
    assert times["round_trips"] < 2.0, outcome
    assert code == 0, other
    _check_flood_output(head, total)


# ----------------------------------------------------------------------- logs

_LOG_APP = """
config = PoolConfig(grace_period=0.3, restart_grace_period=0.3, ensure_timeout=15, workers=[
    spec("ok", "idle", num=1),
    spec("bad", "crash_at_boot", max_consecutive_failures=3),
    spec("stubborn", "stuck", num=1),
])
pool = Pool(config)
pool.start()
try:
    pool.ensure("bad", timeout=10)
except bgpool.WorkerAborted:
    pass
else:
    raise SystemExit("app: bad did not abort")
ok_pid = pool.status()[0].pid
pool.shutdown()
result({"app_pid": os.getpid(), "ok_pid": ok_pid})
"""

LOG_LINE = re.compile(r"bgpool\[(\d+)\] (DEBUG|INFO|WARNING|ERROR|CRITICAL) (.*)")


def _log_lines(stderr: str) -> list[tuple[int, str, str]]:
    out = []
    for line in stderr.splitlines():
        m = LOG_LINE.fullmatch(line)
        if m:
            out.append((int(m.group(1)), m.group(2), m.group(3)))
    return out


def _find(logs: list[tuple[int, str, str]], level: str, pattern: str) -> bool:
    return any(lv == level and re.match(pattern, msg) for _, lv, msg in logs)


def test_transitions_are_logged_at_info(sentinel_dir: Path) -> None:
    proc = run_app(_LOG_APP, sentinel_dir, BGPOOL_LOG_LEVEL="INFO")
    logs = _log_lines(proc.stderr)
    facts = read_json(sentinel_dir / "result.json")
    assert logs, proc.stderr
    pids = {pid for pid, _, _ in logs}
    assert len(pids) == 1 and facts["app_pid"] not in pids  # the supervisor logs
    expected = [
        ("INFO", r"ok\.0 starting\b.*\b" + str(facts["ok_pid"]) + r"\b"),  # spawned
        ("INFO", r"ok\.0 ready: took its handle [\d.]+ ?m?s after spawn"),
        ("WARNING", r"bad\.0 crashed: exit status 1: RuntimeError: boom \(.*workers\.py"),
        ("INFO", r"bad\.0 backoff: restart in 0\.1s after exit status 1"),
        ("ERROR", r"bad\.0 aborted: gave up after 3\b"),
        ("INFO", r"ok\.0 stopping: stop pipe closed, grace period 0\.3s"),
        ("INFO", r"ok\.0 stopped\b.*exit status 0"),  # drained
        ("INFO", r"stubborn\.0 stopping: stop pipe closed, grace period 0\.3s"),
        ("WARNING", r"stubborn\.0 did not stop within its grace period: SIGTERM to its"
                    r" process tree"),
        ("WARNING", r"stubborn\.0 .*SIGKILL"),  # force-killed
    ]  # fmt: skip
    missing = [(lv, p) for lv, p in expected if not _find(logs, lv, p)]
    assert not missing, f"missing log lines {missing} in:\n{proc.stderr}"
    # each of the 3 boot failures is logged once: two crashes, then the abort
    failures = [m for _, _, m in logs if m.startswith(("bad.0 crashed", "bad.0 aborted"))]
    assert len(failures) == 3, failures
    assert "exit status 1: RuntimeError: boom" in failures[-1]


def test_default_log_level_is_warning(sentinel_dir: Path) -> None:
    proc = run_app(_LOG_APP, sentinel_dir)
    logs = _log_lines(proc.stderr)
    assert not [line for line in logs if line[1] in ("DEBUG", "INFO")], proc.stderr
    assert _find(logs, "WARNING", r"bad\.0 crashed: exit status 1: RuntimeError: boom")
    assert _find(logs, "ERROR", r"bad\.0 aborted: gave up after 3\b")
    assert _find(logs, "WARNING", r"stubborn\.0 did not stop within its grace period: SIGTERM")


def test_log_level_error_hides_warnings(sentinel_dir: Path) -> None:
    proc = run_app(_LOG_APP, sentinel_dir, BGPOOL_LOG_LEVEL="ERROR")
    logs = _log_lines(proc.stderr)
    assert {lv for _, lv, _ in logs} == {"ERROR"}, proc.stderr
    assert _find(logs, "ERROR", r"bad\.0 aborted: gave up after 3\b")
