"""Faults an independent fault suite found, each fixed in the library: a reply
bigger than the control protocol's frame, an application with its stdio
closed, running out of descriptors, a start that fails half-way, and the small
ones (huge exception messages in the log, async def targets)."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import gone, wait_for

import bgpool

ROOT = Path(__file__).resolve().parents[2]


def faulty(name: str | None, target: str, **kwargs: Any) -> bgpool.WorkerSpec:
    return bgpool.WorkerSpec(name=name, target=f"fixtures.faults:{target}", **kwargs)


def run_app(
    code: str, tmp_path: Path, timeout: float = 60.0, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run `code` as an application in a fresh interpreter; it writes its
    findings as JSON to the path in `OUT` (its stdio may be closed). They
    come back with its stderr (where its supervisor logs) as "stderr"."""
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OUT": str(out), **(env or {})}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert out.exists(), f"the application wrote nothing (exit {done.returncode}): {done.stderr}"
    result: dict[str, Any] = json.loads(out.read_text())
    result["stderr"] = done.stderr
    return result


@pytest.mark.parametrize("binary", [False, True], ids=["long-lines", "invalid-utf8"])
def test_a_reply_bigger_than_a_frame_does_not_kill_the_supervisor(
    make_pool: Any, binary: bool
) -> None:
    """A batch of catch-all names failing at boot after printing 16 kB lines:
    the timeout reply is budgeted to fit its frame, and the supervisor (and
    every worker) survives it."""
    env = {"LINES": "20", "WIDTH": "16384", **({"BINARY": "1"} if binary else {})}
    pool = make_pool(
        [faulty(None, "loud_boot_failure", env=env, max_consecutive_failures=-1),
         faulty("steady", "idle", num=1)],
    )  # fmt: skip
    steady = [s.pid for s in pool.status() if s.name == "steady"]
    names = [f"loud-{i}" for i in range(6)]
    with pytest.raises(bgpool.EnsureTimeout) as caught:
        pool.ensure(names, timeout=3.0)
    assert caught.value.diagnostics is not None
    assert caught.value.diagnostics.last_output, "the diagnostics lost the output tail"
    assert all(len(line) < 2000 for line in caught.value.diagnostics.last_output)
    assert any("more characters" in line for line in caught.value.diagnostics.last_output)
    pool.ensure("steady")  # the supervisor still answers, the worker still runs
    assert [s.pid for s in pool.status() if s.name == "steady"] == steady
    assert pool.diagnostics("loud-0").state in {"starting", "crashed", "backoff"}


def test_an_application_with_stdio_closed_gives_each_worker_its_own_stop_pipe(
    tmp_path: Path,
) -> None:
    """fds 0-2 closed in the application: every worker still holds exactly
    its own stop pipe, so a drain reaches each at once (no SIGTERM needed)."""
    result = run_app(
        """
        import json, os, time
        for fd in (0, 1, 2):
            os.close(fd)
        import bgpool
        config = bgpool.PoolConfig(
            workers=[bgpool.WorkerSpec(name="w", target="fixtures.faults:idle", num=4)],
            grace_period=20.0,
        )
        pool = bgpool.Pool(config)
        pool.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(s.state != "ready" for s in pool.status()):
            time.sleep(0.01)
        pids = [s.pid for s in pool.status()]
        states = [s.state for s in pool.status()]
        t0 = time.monotonic()
        pool.shutdown()
        elapsed = time.monotonic() - t0
        with open(os.environ["OUT"], "w") as f:
            json.dump({"pids": pids, "states": states, "shutdown": elapsed}, f)
        """,
        tmp_path,
    )
    assert result["states"] == ["ready"] * 4
    assert result["shutdown"] < 5.0, "a worker did not see its drain (grace period 20 s)"
    assert not [p for p in result["pids"] if psutil.pid_exists(p)]


def test_out_of_descriptors_at_start_is_a_startup_error_naming_the_limit(tmp_path: Path) -> None:
    result = run_app(
        """
        import json, os, resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        import bgpool
        config = bgpool.PoolConfig(
            workers=[bgpool.WorkerSpec(name="w", target="fixtures.faults:idle", num=30)]
        )
        pool = bgpool.Pool(config)
        try:
            pool.start()
            found = {"error": None}
        except bgpool.BgpoolError as exc:
            found = {"error": type(exc).__name__, "message": str(exc)}
        finally:
            pool.shutdown()
        with open(os.environ["OUT"], "w") as f:
            json.dump(found, f)
        """,
        tmp_path,
    )
    assert result["error"] == "StartupError"
    assert "RLIMIT_NOFILE: soft 64, hard 64" in result["message"]


def test_a_spawn_out_of_descriptors_answers_at_once_and_frees_the_name(tmp_path: Path) -> None:
    """Lazy catch-all names until the supervisor runs out of descriptors: the
    one that cannot be spawned fails at once with the cause (not after its
    deadline), its name is freed, and the supervisor goes on serving."""
    result = run_app(
        """
        import json, os, resource, time
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100))
        import bgpool
        config = bgpool.PoolConfig(workers=[
            bgpool.WorkerSpec(target="fixtures.faults:idle", max_instances=100)
        ])
        with bgpool.Pool(config) as pool:
            found = {"error": None}
            for i in range(100):
                t0 = time.monotonic()
                try:
                    pool.ensure(f"n{i}", timeout=20)
                except bgpool.BgpoolError as exc:
                    found = {"error": type(exc).__name__, "message": str(exc),
                             "seconds": time.monotonic() - t0, "name": f"n{i}"}
                    break
            found["hosted"] = sorted(s.name for s in pool.status())
            found["diag"] = pool.diagnostics("n0").state
        with open(os.environ["OUT"], "w") as f:
            json.dump(found, f)
        """,
        tmp_path,
    )
    assert result["error"] == "WorkerAborted", result
    assert "Too many open files" in result["message"]
    assert "RLIMIT_NOFILE" in result["message"]
    assert result["seconds"] < 5.0, "the failed spawn waited out its deadline"
    assert result["name"] not in result["hosted"], "the failed name kept its slot"
    assert result["diag"] == "ready"
    # nothing in the supervisor failed on the way (a spare offered once no
    # descriptor was left for its socket, psutil's import at an idle moment)
    assert "internal error" not in result["stderr"], result["stderr"]


def test_a_slow_import_is_named_in_the_log_while_the_supervisor_waits(tmp_path: Path) -> None:
    """A target module whose import does not return (here until the test
    writes to a FIFO): the supervisor, which waits for its generation to
    load, says in its log which module it is waiting on; once the import
    returns, the pool starts as usual."""
    release = tmp_path / "release.fifo"
    os.mkfifo(release)
    log = tmp_path / "supervisor.log"
    result = run_app(
        f"""
        import json, os, threading, time
        log = open({str(log)!r}, "w")
        os.dup2(log.fileno(), 2)  # the supervisor's stderr, where it logs
        import bgpool
        config = bgpool.PoolConfig(workers=[
            bgpool.WorkerSpec(name="slow", target="fixtures.slow_import:run")
        ])
        pool = bgpool.Pool(config)
        started = threading.Thread(target=pool.start)
        t0 = time.monotonic()
        started.start()
        deadline = time.monotonic() + 40
        while "importing fixtures.slow_import" not in open({str(log)!r}).read():
            assert time.monotonic() < deadline, "no warning"
            time.sleep(0.05)
        warned = time.monotonic() - t0
        with open(os.environ["RELEASE"], "wb") as fifo:
            fifo.write(b"x")
        started.join()
        pool.ensure("slow", timeout=10)
        found = {{"warned_after": warned, "state": pool.diagnostics("slow").state}}
        pool.shutdown()
        with open(os.environ["OUT"], "w") as f:
            json.dump(found, f)
        """,
        tmp_path,
        env={"RELEASE": str(release)},
    )
    assert result["state"] == "ready", result
    assert result["warned_after"] >= 9.0, "warned before the import was slow"
    text = log.read_text()
    assert "code generation 1 has been importing fixtures.slow_import for 10 s" in text, text


def test_a_failed_start_leaves_no_shared_memory(tmp_path: Path) -> None:
    """A socket path too long for AF_UNIX: StartupError naming the cause, and
    no segment of the pool's is left (its table name is the owner's choice,
    read here from the one private attribute that holds it)."""
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    result = run_app(
        f"""
        import json, os, tempfile
        tempfile.tempdir = {str(deep)!r}
        import bgpool
        config = bgpool.PoolConfig(
            workers=[bgpool.WorkerSpec(name="w", target="fixtures.faults:idle", num=1)]
        )
        pool = bgpool.Pool(config)
        try:
            pool.start()
            found = {{"error": None}}
        except bgpool.BgpoolError as exc:
            found = {{"error": type(exc).__name__, "message": str(exc)}}
        pool.shutdown()
        table = pool._table_name
        found["table"] = table
        found["left"] = sorted(n for n in os.listdir("/dev/shm") if n.startswith(table))
        with open(os.environ["OUT"], "w") as f:
            json.dump(found, f)
        """,
        tmp_path,
    )
    assert result["error"] == "StartupError"
    assert "AF_UNIX path too long" in result["message"], result["message"]
    assert re.fullmatch(r"bgp_[0-9a-f]{16}", result["table"])
    assert result["left"] == []


def test_a_huge_exception_message_is_cut_in_the_supervisor_log(make_pool: Any, capfd: Any) -> None:
    pool = make_pool([faulty("big", "huge_exception", max_consecutive_failures=1)])
    with pytest.raises(bgpool.WorkerAborted) as caught:
        pool.ensure("big")
    assert caught.value.diagnostics is not None
    logged = capfd.readouterr().err.splitlines()
    mentions = [line for line in logged if line.startswith("bgpool[") and "EEEE" in line]
    assert mentions, logged
    assert all(len(line) <= 2100 for line in mentions), max(map(len, mentions))


def _supervisor(pool: Any) -> psutil.Process:
    worker = next(s.pid for s in pool.status() if s.pid)
    parent = psutil.Process(worker).parent()
    assert parent is not None
    return parent


def _closed_calls(pool: Any) -> dict[str, Any]:
    return {
        "ensure": lambda: pool.ensure("w"),
        "ensure-batch": lambda: pool.ensure(["w", "lazy"]),
        "status": pool.status,
        "diagnostics": lambda: pool.diagnostics("w"),
        "get_vars": lambda: pool.get_vars("w"),
    }


def _racing_calls(pool: Any, client: Any) -> list[Any]:
    """Every kind of call, on the owner and on a connect() client."""
    calls = [*_closed_calls(pool).values(), *_closed_calls(client).values()]
    names = itertools.count()
    calls.append(lambda: pool.ensure(f"tenant-{next(names)}", timeout=5))
    calls.append(pool.restart_workers)
    return calls


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_supervisor_stopped_by_an_operator_closes_the_pool_for_every_client(
    make_pool: Any, how: str
) -> None:
    """SIGTERM to the supervisor (it drains and exits 0) or SIGKILL: the owner
    and a connect() client then raise PoolClosed on every call, fast path
    included: a stale table must not keep answering "ready"."""
    pool = make_pool([faulty("w", "publisher", num=1), faulty("lazy", "idle")])
    client = bgpool.connect(pool.address)
    try:
        client.ensure("w")
        assert client.get_vars("w")["n"] == 1
        supervisor = _supervisor(pool)
        supervisor.send_signal(getattr(signal, how))
        # The owner's watcher reaps it: wait for its exit, without reaping it.
        wait_for(lambda: gone(supervisor.pid), 10, "the supervisor's exit")
        deadline = time.monotonic() + 5
        for who in (pool, client):
            for what, call in _closed_calls(who).items():
                while True:
                    try:
                        call()
                    except bgpool.PoolClosed:
                        break
                    assert time.monotonic() < deadline, f"{what} still answers after the stop"
                    time.sleep(0.01)
    finally:
        client.close()


def _hammer(call: Any, warmed: threading.Barrier, stop: threading.Event, odd: list[str]) -> None:
    """Call `call` until `stop`, noting any outcome but a result or PoolClosed."""
    for done in itertools.count():
        if done == 20:
            warmed.wait(timeout=20)
        if stop.is_set():
            return
        try:
            call()
        except bgpool.PoolClosed:
            pass
        except Exception as exc:  # anything else is the defect
            odd.append(f"{type(exc).__name__}: {exc}")


def test_calls_racing_shutdown_see_a_result_or_pool_closed(make_pool: Any) -> None:
    """16 threads call ensure(), status(), get_vars() and diagnostics() while two
    others shut the pool down: each call returns normally or raises PoolClosed,
    and the second shutdown() returns only once the pool is closed."""
    for _ in range(3):
        pool = make_pool(
            [faulty("w", "publisher", num=1), faulty("lazy", "idle"),
             faulty(None, "idle", max_instances=1000)]
        )  # fmt: skip
        supervisor = _supervisor(pool)
        client = bgpool.connect(pool.address)
        calls = _racing_calls(pool, client)
        stop = threading.Event()
        warmed = threading.Barrier(17)
        odd: list[str] = []
        threads = [
            threading.Thread(target=_hammer, args=(calls[i % len(calls)], warmed, stop, odd))
            for i in range(16)
        ]
        for thread in threads:
            thread.start()
        warmed.wait(timeout=20)
        first = threading.Thread(target=pool.shutdown)
        first.start()
        time.sleep(0.005)  # let the first shutdown begin (it drains for a while)
        pool.shutdown()
        closed_at_return = not supervisor.is_running() or supervisor.status() == "zombie"
        first.join(timeout=30)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        client.close()
        assert not odd, odd[:5]
        assert closed_at_return, "the second shutdown() returned before the pool was closed"
        with pytest.raises(bgpool.PoolClosed):
            pool.status()


def test_cost_follows_what_is_hosted_not_the_cap(make_pool: Any) -> None:
    """A catch-all allowed a million names, hosting one: start(), status(),
    connect() and shutdown() cost what runs (they took 7-10 s each when they
    scanned every slot the cap allowed)."""
    took: dict[str, float] = {}

    def timed(what: str, call: Any) -> Any:
        t0 = time.monotonic()
        result = call()
        took[what] = time.monotonic() - t0
        return result

    pool = make_pool([faulty(None, "idle", max_instances=10**6)], start=False)
    timed("start", pool.start)
    pool.ensure("one")
    assert [s.name for s in timed("status", pool.status)] == ["one"]
    client = timed("connect", lambda: bgpool.connect(pool.address))
    client.close()
    timed("shutdown", pool.shutdown)
    assert all(seconds < 1.5 for seconds in took.values()), took


def test_a_client_out_of_descriptors_gets_a_bgpool_error_naming_the_limit(
    make_pool: Any, tmp_path: Path
) -> None:
    pool = make_pool([faulty("w", "idle", num=1)])
    result = run_app(
        f"""
        import json, os, resource
        import bgpool
        client = bgpool.connect({pool.address!r})
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        hog = []
        try:
            while True:
                hog.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        try:
            client.diagnostics("w")
            found = {{"error": None}}
        except Exception as exc:
            found = {{"error": type(exc).__name__, "message": str(exc)}}
        for fd in hog:
            os.close(fd)
        found["after"] = client.diagnostics("w").state
        client.close()
        with open(os.environ["OUT"], "w") as f:
            json.dump(found, f)
        """,
        tmp_path,
    )
    assert result["error"] == "BgpoolError", result
    assert "RLIMIT_NOFILE: soft 64" in result["message"]
    assert result["after"] == "ready"
