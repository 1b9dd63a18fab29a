"""Per-worker control (SPEC, "Operating a pool"): ``stop(names)``,
``start_workers(names)`` and ``scale(name, num)`` on a pool and on its clients,
and ``bgpool start``, ``stop``, ``scale``, ``restart`` and ``status``'s exit
status from a second shell.

Every case runs a real pool and checks what the table says (pids, states)
against the processes themselves: a drained worker's process is really gone,
a stopped one is not started again by anything but ``ensure()`` or
``start_workers()``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import (
    ROOT,
    Background,
    alive,
    gone,
    http_get,
    published,
    spec,
    starts,
    statuses,
    subprocess_env,
    tenant_log,
    the_status,
    wait_all_gone,
    wait_for,
)
from prometheus_client import CollectorRegistry
from test_cli_commands import cli, parse_table
from test_restart_rolling import stays

import bgpool
import bgpool.metrics

MakePool = Callable[..., Any]
NOT_DECLARED = 'no background worker configured for name "{}"'


def pids(pool: Any, name: str) -> dict[int, int | None]:
    """Each instance's pid, by index."""
    return {s.instance: s.pid for s in statuses(pool, name)}


def states(pool: Any, name: str) -> dict[int, str]:
    return {s.instance: s.state for s in statuses(pool, name)}


def running(pool: Any, name: str, count: int) -> dict[int, int]:
    """The pids of ``name``'s ``count`` instances, once each is ready."""

    def check() -> dict[int, int] | None:
        found = statuses(pool, name)
        if len(found) == count and all(s.state == "ready" for s in found):
            return {s.instance: int(s.pid) for s in found}
        return None

    return wait_for(check, timeout=10, what=f"{count} ready instances of {name}")


def metric(pool: Any, family: str, name: str) -> float | None:
    """One sample of bgpool's metrics for ``name``, read through a registry of our own."""
    registry = CollectorRegistry()
    bgpool.metrics.collector(pool, registry)
    return registry.get_sample_value(family, {"worker": f"m#:{name}"})


def events_of(watch: Any, until: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    """The events a watch received, read until ``until(events)`` holds."""
    seen: list[dict[str, Any]] = []

    def enough() -> bool:
        seen.extend(watch.events() or [])
        return until(seen)

    wait_for(enough, timeout=10, what="the watch's events")
    return seen


# ---------------------------------------------------------------------- stop


def test_stop_drains_every_instance_and_returns_once_they_exited(make_pool: MakePool) -> None:
    pool = make_pool([spec("web", "idle", num=2), spec("other", "idle", num=1)])
    old = running(pool, "web", 2)
    other = the_status(pool, "other").pid

    pool.stop("web")

    assert not [pid for pid in old.values() if alive(pid)], "stop() returned before the exits"
    assert states(pool, "web") == {0: "stopped", 1: "stopped"}
    assert pids(pool, "web") == {0: None, 1: None}
    assert all(s.last_exit_status == 0 for s in statuses(pool, "web"))  # drained: EOF, exit 0
    assert the_status(pool, "other").pid == other  # nothing else touched
    diagnostics = pool.diagnostics("web")
    assert (diagnostics.state, diagnostics.ever_ready) == ("stopped", True)
    # declared still: its slots stay, counted as instances that are not ready
    assert metric(pool, "bgpool_total_workers", "web") == 2
    assert metric(pool, "bgpool_ready_workers", "web") == 0
    pool.stop(["web"])  # stopping what is stopped: nothing to wait for
    assert states(pool, "web") == {0: "stopped", 1: "stopped"}


def test_stop_kills_a_worker_that_ignores_the_drain(make_pool: MakePool) -> None:
    pool = make_pool([spec("stuck", "stuck", num=1)], grace_period=0.5)
    pid = the_status(pool, "stuck").pid
    assert pid is not None
    t0 = time.monotonic()
    pool.stop("stuck")
    took = time.monotonic() - t0
    assert gone(pid)
    assert 1.4 <= took < 5, took  # grace period, SIGTERM (ignored), SIGKILL 1 s later
    status = the_status(pool, "stuck")
    assert (status.state, status.pid, status.last_exit_status) == ("stopped", None, -9)
    assert pool.diagnostics("stuck").last_signal == "SIGKILL"


def test_ensure_starts_a_stopped_worker_and_waits_for_it(make_pool: MakePool) -> None:
    pool = make_pool([spec("slow", "slow_ready", num=1, env={"DELAY": "0.4"})])
    old = the_status(pool, "slow").pid
    pool.stop("slow")
    t0 = time.monotonic()
    pool.ensure("slow")  # not answered from the table: the stopped name is not ready
    assert time.monotonic() - t0 >= 0.4
    status = the_status(pool, "slow")
    assert status.state == "ready" and status.pid not in (None, old)


def test_start_workers_returns_without_waiting(make_pool: MakePool) -> None:
    pool = make_pool(
        [spec("slow", "slow_ready", num=2, env={"DELAY": "1.0"}), spec("lazy", "idle")],
        ensure_timeout=10.0,
    )
    running(pool, "slow", 2)
    pool.stop("slow")
    t0 = time.monotonic()
    pool.start_workers(["slow", "lazy"])
    assert time.monotonic() - t0 < 0.9
    assert set(states(pool, "slow").values()) == {"starting"}
    assert all(pid is not None for pid in pids(pool, "slow").values())
    running(pool, "slow", 2)
    running(pool, "lazy", 1)  # a lazy worker, started without an ensure()
    pool.start_workers("lazy")  # already running: nothing changes
    assert states(pool, "lazy") == {0: "ready"}


def test_stop_cancels_a_pending_crash_restart(make_pool: MakePool, sentinel_dir: Path) -> None:
    log = sentinel_dir / "starts"
    pool = make_pool(
        [spec("bad", "crash_at_boot", max_consecutive_failures=-1, env={"STARTS": str(log)})]
    )
    pool.start_workers("bad")

    def backing_off() -> bool:
        s = the_status(pool, "bad")
        return bool(s.state == "backoff" and s.consecutive_failures >= 3)  # waits >= 0.4 s

    wait_for(backing_off, timeout=10, what="a restart waiting out its backoff")
    pool.stop("bad")
    status = the_status(pool, "bad")
    attempts = len(starts(log))
    assert (status.state, status.pid, status.attempts) == ("stopped", None, attempts)
    stays(lambda: len(starts(log)) == attempts, 1.5, "the cancelled restart ran after all")
    assert the_status(pool, "bad").state == "stopped"


def test_a_stopped_eager_worker_stays_stopped_whatever_else_happens(
    make_pool: MakePool, sentinel_dir: Path
) -> None:
    log = sentinel_dir / "kept"
    workers = [spec("kept", "idle", num=1, env={"STARTS": str(log)}),
               spec("crashy", "crashable", num=1)]  # fmt: skip
    pool = make_pool(workers)
    pool.stop("kept")
    attempts = the_status(pool, "kept").attempts

    crashy = the_status(pool, "crashy").pid
    assert crashy is not None
    os.kill(crashy, signal.SIGUSR1)  # another worker crashes and is restarted
    seen: list[bgpool.WorkerStatus] = []

    def restarted() -> bool:
        seen[:] = [the_status(pool, "crashy")]
        return seen[0].state == "ready" and seen[0].pid != crashy

    try:
        wait_for(restarted, timeout=10, what="crashy restarted")
    except AssertionError as exc:  # say which side is stuck: the worker or the supervisor
        process = "gone"
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(crashy).status()
        raise AssertionError(f"{exc}; last seen {seen[0]}; the crashed one: {process}") from None
    pool.restart_workers()  # new code for what runs: not for what is stopped
    report = pool.reload(pool.config)  # the same declarations again
    assert "kept" in report.unchanged
    changed = bgpool.PoolConfig(
        workers=[spec("kept", "idle", num=2, env={"STARTS": str(log)}),
                 spec("crashy", "crashable", num=1)],
        grace_period=pool.config.grace_period, ensure_timeout=pool.config.ensure_timeout,
        start_method=pool.config.start_method,
    )  # fmt: skip
    assert "kept" in pool.reload(changed).changed  # grown while stopped: still stopped
    assert states(pool, "kept") == {0: "stopped", 1: "stopped"}
    assert the_status(pool, "crashy").state == "ready"
    assert [s.attempts for s in statuses(pool, "kept")] == [attempts, 0]
    assert len(starts(log)) == 1

    pool.start_workers("kept")  # starts them all
    running(pool, "kept", 2)
    assert len(starts(log)) == 3


def test_stop_of_a_worker_that_was_given_up(make_pool: MakePool, sentinel_dir: Path) -> None:
    flag = sentinel_dir / "fail"
    flag.touch()
    pool = make_pool(
        [spec("flaky", "fail_while_flag", max_consecutive_failures=2, env={"FAIL_FLAG": str(flag)})]
    )
    with pytest.raises(bgpool.WorkerAborted):
        pool.ensure("flaky")
    assert the_status(pool, "flaky").state == "aborted"
    pool.stop("flaky")
    assert the_status(pool, "flaky").state == "stopped"
    flag.unlink()
    pool.start_workers("flaky")  # a fresh try: the failures before do not count
    status = running(pool, "flaky", 1)
    assert the_status(pool, "flaky").consecutive_failures == 0, status


def test_a_call_waiting_for_a_worker_hears_that_it_was_stopped(make_pool: MakePool) -> None:
    pool = make_pool([spec("never", "never_ready"), spec("web", "idle", num=1)], grace_period=0.5)
    waiting = Background(lambda: pool.ensure(["never", "web"], timeout=30))
    wait_for(lambda: the_status(pool, "never").state == "starting", what="never started")
    pool.stop("never")
    waiting.wait(5, "ensure()")  # at once, not at its deadline
    assert type(waiting.error) is bgpool.BgpoolError, waiting.error
    assert str(waiting.error) == (
        'background worker "never" was stopped while this call waited for it; '
        "ensure() or start_workers() starts it again"
    )
    assert the_status(pool, "web").state == "ready"


def test_ensure_during_a_stop_starts_the_worker_again(make_pool: MakePool) -> None:
    pool = make_pool([spec("stuck", "stuck", num=1)], grace_period=1.0)
    old = the_status(pool, "stuck").pid
    stopping = Background(lambda: pool.stop("stuck"))
    wait_for(lambda: the_status(pool, "stuck").state == "stopping", what="the drain")
    pool.ensure("stuck", timeout=10)  # waits for the drain to end, then for the new run
    stopping.wait(10, "stop()")
    assert stopping.error is None, stopping.error
    status = the_status(pool, "stuck")
    assert status.state == "ready" and status.pid not in (None, old)
    assert old is not None and gone(old)


def test_bad_arguments_change_nothing(make_pool: MakePool) -> None:
    pool = make_pool([spec("a", "idle", num=1), spec(None, "idle", max_instances=1)])
    a = the_status(pool, "a").pid
    pool.ensure("t1")
    with pytest.raises(bgpool.CatchAllLimitReached):
        pool.start_workers(["a", "t2"])  # t2 would be a second catch-all name
    cases: list[tuple[Callable[[], None], type[Exception]]] = [
        (lambda: pool.stop([]), ValueError),
        (lambda: pool.stop(["a", "a"]), ValueError),
        (lambda: pool.stop(b"a"), TypeError),
        (lambda: pool.start_workers(""), ValueError),
        (lambda: pool.start_workers([1]), TypeError),
        (lambda: pool.stop("a", scope="nosuch"), ValueError),
    ]
    for call, error in cases:
        with pytest.raises(error):
            call()
    assert the_status(pool, "a").pid == a and the_status(pool, "a").state == "ready"
    assert statuses(pool, "t2") == []


def test_stop_of_catch_all_names(make_pool: MakePool) -> None:
    pool = make_pool([spec(None, "idle")])
    pool.ensure(["t1", "t2"])
    t1, t2 = the_status(pool, "t1").pid, the_status(pool, "t2").pid
    pool.stop(["t1", "not-hosted"])  # a name the catch-all does not host: nothing runs
    assert t1 is not None and gone(t1)
    assert states(pool, "t1") == {0: "stopped"}  # keeps its place, stopped
    assert statuses(pool, "not-hosted") == []
    assert the_status(pool, "t2").pid == t2
    pool.ensure("t1")
    assert the_status(pool, "t1").pid not in (None, t1)


def test_undeclared_names_stop_nothing(make_pool: MakePool) -> None:
    pool = make_pool([spec("a", "idle", num=1)])
    a = the_status(pool, "a").pid
    for call in (pool.stop, pool.start_workers):
        with pytest.raises(bgpool.WorkerNotDeclared) as info:
            call(["a", "nosuch"])
        assert str(info.value) == NOT_DECLARED.format("nosuch")
    assert the_status(pool, "a").pid == a and the_status(pool, "a").state == "ready"


def test_a_client_in_another_process_stops_and_starts(make_pool: MakePool) -> None:
    pool = make_pool([spec("a", "idle", num=1)])
    old = the_status(pool, "a").pid
    code = (
        "import bgpool\n"
        "client = bgpool.connect()\n"
        "client.stop('a')\n"
        "print(client.status()[0].state, flush=True)\n"
        "client.start_workers(['a'])\n"
        "client.ensure('a')\n"
        "client.scale('a', 2)\n"
        "print(len(client.status()), flush=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
        timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["stopped", "2"]
    assert old is not None and gone(old)
    running(pool, "a", 2)


def test_calls_after_shutdown_raise_pool_closed(make_pool: MakePool) -> None:
    pool = make_pool([spec("a", "idle", num=1)])
    pool.shutdown()
    calls: list[Callable[[], None]] = [
        lambda: pool.stop("a"), lambda: pool.start_workers("a"), lambda: pool.scale("a", 2)
    ]  # fmt: skip
    for call in calls:
        with pytest.raises(bgpool.PoolClosed, match=r"^pool is closed$"):
            call()


# --------------------------------------------------------------------- scale


def test_scale_up_starts_new_instances_and_leaves_the_others(make_pool: MakePool) -> None:
    pool = make_pool([spec("web", "idle", num=2)])
    before = running(pool, "web", 2)
    with pool.watch() as watch:
        pool.scale("web", 4)
        after = running(pool, "web", 4)
        events = events_of(watch, lambda seen: sum(e["state"] == "ready" for e in seen) >= 2)
    assert {i: after[i] for i in (0, 1)} == before  # the running ones untouched
    assert {e["instance"] for e in events} == {2, 3}, events
    assert all(e["worker"] == "web" for e in events)
    assert metric(pool, "bgpool_total_workers", "web") == 4
    assert metric(pool, "bgpool_ready_workers", "web") == 4
    assert all(s.eager for s in statuses(pool, "web"))

    pool.restart_workers("web")  # a rolling restart replaces the new instances too
    restarted = running(pool, "web", 4)
    assert not set(restarted.values()) & set(after.values())
    wait_all_gone(after.values(), 5, "the replaced instances")


def test_scale_down_drains_the_highest_indexes(make_pool: MakePool, sentinel_dir: Path) -> None:
    log = sentinel_dir / "eof"
    pool = make_pool([spec("web", "tenant", num=4, env={"EOF_LOG": str(log)})])
    before = running(pool, "web", 4)
    with pool.watch() as watch:
        pool.scale("web", 2)
        events = events_of(watch, lambda seen: sum(e["state"] == "stopped" for e in seen) >= 2)
    assert sorted((e["instance"], e["state"]) for e in events) == [
        (2, "stopped"), (2, "stopping"), (3, "stopped"), (3, "stopping")
    ], events  # fmt: skip
    assert pids(pool, "web") == {0: before[0], 1: before[1]}
    assert gone(before[2]) and gone(before[3])  # exited before scale() returned
    drained = sorted(instance for _, _, _, instance, _ in tenant_log(log))
    assert drained == [2, 3]  # each saw its drain (EOF), then exited
    assert metric(pool, "bgpool_total_workers", "web") == 2
    assert states(pool, "web") == {0: "ready", 1: "ready"}
    assert pool.diagnostics("web").instances == statuses(pool, "web")

    pool.scale("web", 3)  # its slots are handed out again
    after = running(pool, "web", 3)
    assert (after[0], after[1]) == (before[0], before[1])
    assert after[2] not in before.values()


def test_scale_to_zero_stops_everything_and_makes_the_worker_lazy(
    make_pool: MakePool,
) -> None:
    pool = make_pool([spec("web", "idle", num=3)])
    before = running(pool, "web", 3)
    pool.scale("web", 0)
    assert not [pid for pid in before.values() if alive(pid)]
    (only,) = statuses(pool, "web")
    assert (only.instance, only.state, only.pid, only.eager) == (0, "stopped", None, False)
    pool.ensure("web")  # a lazy worker now: one instance
    assert running(pool, "web", 1)[0] not in before.values()
    pool.scale("web", 2)  # eager again: both run
    running(pool, "web", 2)
    assert all(s.eager for s in statuses(pool, "web"))


def test_scale_of_a_stopped_worker_starts_nothing_until_it_is_started(
    make_pool: MakePool,
) -> None:
    pool = make_pool([spec("web", "idle", num=1)])
    pool.stop("web")
    pool.scale("web", 3)
    assert states(pool, "web") == {0: "stopped", 1: "stopped", 2: "stopped"}
    assert all(pid is None for pid in pids(pool, "web").values())
    pool.start_workers("web")
    running(pool, "web", 3)


def test_scale_holds_until_a_reload_changes_the_declaration(make_pool: MakePool) -> None:
    pool = make_pool([spec("web", "idle", num=2), spec("other", "idle", num=1)])
    pool.scale("web", 3)
    kept = running(pool, "web", 3)
    report = pool.reload(pool.config)  # the same config: the scaled count stays
    assert "web" in report.unchanged
    assert running(pool, "web", 3) == kept

    changed = bgpool.PoolConfig(
        workers=[spec("web", "idle", num=2, env={"V": "2"}), spec("other", "idle", num=1)],
        grace_period=pool.config.grace_period, ensure_timeout=pool.config.ensure_timeout,
        start_method=pool.config.start_method,
    )  # fmt: skip
    assert "web" in pool.reload(changed).changed  # its num (2) applies again
    after = running(pool, "web", 2)
    assert not set(after.values()) & set(kept.values())  # restarted with the new env
    assert gone(kept[2])


def test_stop_during_a_rolling_restart_ends_that_workers_restart(make_pool: MakePool) -> None:
    pool = make_pool(
        [spec("slow", "slow_ready", num=3, env={"DELAY": "0.5"})], restart_grace_period=1.0
    )
    before = running(pool, "slow", 3)
    restart = Background(pool.restart_workers)
    wait_for(lambda: pids(pool, "slow")[0] != before[0], what="the rollout's first step")
    pool.stop("slow")
    restart.wait(10, "restart_workers()")
    assert restart.error is None, restart.error
    assert states(pool, "slow") == {0: "stopped", 1: "stopped", 2: "stopped"}
    wait_all_gone(before.values(), 5, "the old instances")


def test_scale_rejects_bad_arguments_with_their_names(make_pool: MakePool) -> None:
    pool = make_pool([spec("web", "idle", num=1)])
    web = the_status(pool, "web").pid
    cases: list[tuple[Callable[[], None], type[Exception], str]] = [
        (lambda: pool.scale("web", -1), ValueError, "num must be >= 0, not -1"),
        (lambda: pool.scale("web", 1.5), TypeError, "num must be an int, not float"),
        (lambda: pool.scale("web", True), TypeError, "num must be an int, not bool"),
        (lambda: pool.scale("web", "2"), TypeError, "num must be an int, not str"),
        (lambda: pool.scale(["web"], 2), TypeError, "name must be a str, not list"),
        (lambda: pool.scale("", 2), ValueError, "worker name '' "),
        (lambda: pool.scale("nosuch", 2), bgpool.WorkerNotDeclared, NOT_DECLARED.format("nosuch")),
        (lambda: pool.scale("web", 10**6), ValueError,
         'cannot scale "web" to 1000000 instances: that needs 999999 more slots in the '
         "readiness table, which has "),
    ]  # fmt: skip
    for call, error, text in cases:
        with pytest.raises(error) as info:
            call()
        assert str(info.value).startswith(text), (text, str(info.value))
    assert pids(pool, "web") == {0: web} and states(pool, "web") == {0: "ready"}


def test_scale_of_a_catch_all_name_is_refused(make_pool: MakePool) -> None:
    pool = make_pool([spec(None, "idle")])
    pool.ensure("tenant-1")
    for name in ("tenant-1", "not-hosted"):
        with pytest.raises(ValueError) as info:
            pool.scale(name, 2)
        assert str(info.value) == (
            f'cannot scale "{name}": it is served by a catch-all (a WorkerSpec with '
            "name=None), which runs one instance per name; only a named worker can be scaled"
        )
    assert states(pool, "tenant-1") == {0: "ready"}


def test_readyz_follows_stop_start_and_scale(make_pool: MakePool) -> None:
    pool = make_pool([spec("web", "idle", num=2), spec("other", "idle", num=1)], metrics_port=0)
    port = pool.metrics_port
    assert port is not None

    def readyz() -> tuple[int, str]:
        code, _, body = http_get(port, "/readyz")
        return code, body

    assert readyz()[0] == 200
    pool.stop("web")  # an eager worker stopped: not ready
    code, body = readyz()
    assert (code, json.loads(body)) == (503, {"ok": False, "waiting": ["web"]})
    pool.start_workers("web")
    wait_for(lambda: readyz()[0] == 200, timeout=10, what="/readyz ready again")
    pool.scale("web", 0)  # no longer eager: not waited for
    assert readyz()[0] == 200
    assert metric(pool, "bgpool_total_workers", "web") == 1


# ----------------------------------------------------------------------- CLI


def test_cli_stop_start_scale_restart(make_pool: MakePool) -> None:
    pool = make_pool([spec("web", "idle", num=2), spec("other", "idle", num=1)])
    old = running(pool, "web", 2)

    proc = cli("stop", "web")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "stopped web\n", "")
    assert not [pid for pid in old.values() if alive(pid)]
    assert states(pool, "web") == {0: "stopped", 1: "stopped"}

    proc = cli("start", "web", "--address", pool.address)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "started web\n", "")
    started = running(pool, "web", 2)

    proc = cli("scale", "web", "3")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "scaled web to 3 instances\n", "")
    grown = running(pool, "web", 3)
    assert (grown[0], grown[1]) == (started[0], started[1])

    proc = cli("restart", "web")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "restarted web\n", "")
    restarted = running(pool, "web", 3)
    assert not set(restarted.values()) & set(grown.values())

    proc = cli("scale", "web", "1")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "scaled web to 1 instance\n", "")
    assert pids(pool, "web") == {0: restarted[0]}
    assert gone(restarted[1]) and gone(restarted[2])
    rows = parse_table(cli("status").stdout)
    assert [(r["WORKER"], r["#"], r["STATE"]) for r in rows] == [
        ("web", "0", "ready"), ("other", "0", "ready")
    ]  # fmt: skip

    proc = cli("stop", "web", "other")
    assert (proc.returncode, proc.stdout) == (0, "stopped web, other\n")
    proc = cli("scale", "web", "0")
    assert (proc.returncode, proc.stdout) == (0, "scaled web to 0 instances\n")


@pytest.mark.parametrize(
    ("args", "code", "stderr"),
    [
        (
            ("stop", "nosuch"),
            1,
            'bgpool: WorkerNotDeclared: no background worker configured for name "nosuch"\n',
        ),
        (
            ("start", "web", "nosuch"),
            1,
            'bgpool: WorkerNotDeclared: no background worker configured for name "nosuch"\n',
        ),
        (
            ("scale", "nosuch", "2"),
            1,
            'bgpool: WorkerNotDeclared: no background worker configured for name "nosuch"\n',
        ),
        (
            ("stop", "web", "--scope", "nosuch"),
            2,
            "bgpool: no single declared scope is labelled 'nosuch'\n",
        ),
        (
            ("scale", "web", "2", "--scope", "nosuch"),
            2,
            "bgpool: no single declared scope is labelled 'nosuch'\n",
        ),
        (("stop", "web", "web"), 2, "bgpool: duplicate worker names: web\n"),
    ],
    ids=["stop", "start", "scale", "stop-scope", "scale-scope", "stop-twice"],
)
def test_cli_errors(make_pool: MakePool, args: tuple[str, ...], code: int, stderr: str) -> None:
    pool = make_pool([spec("web", "idle", num=1)])
    web = the_status(pool, "web").pid
    proc = cli(*args)
    assert (proc.returncode, proc.stdout, proc.stderr) == (code, "", stderr)
    assert pids(pool, "web") == {0: web} and states(pool, "web") == {0: "ready"}


def test_cli_scale_of_a_catch_all_exits_2(make_pool: MakePool) -> None:
    make_pool([spec(None, "idle")])
    proc = cli("scale", "tenant-1", "2")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (
        'bgpool: cannot scale "tenant-1": it is served by a catch-all (a WorkerSpec with '
        "name=None), which runs one instance per name; only a named worker can be scaled\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("scale", "web", "-1"), "bgpool scale: error: argument NUM: must be >= 0, not -1"),
        (("scale", "web", "two"), "bgpool scale: error: argument NUM: not an integer: 'two'"),
        (("scale", "web"), "bgpool scale: error: the following arguments are required: NUM"),
        (("stop",), "bgpool stop: error: the following arguments are required: NAME"),
        (("start",), "bgpool start: error: the following arguments are required: NAME"),
    ],
    ids=["negative", "not-a-number", "no-num", "stop-nothing", "start-nothing"],
)
def test_cli_bad_arguments_exit_2_before_asking_the_pool(
    args: tuple[str, ...], message: str, tmp_path: Path
) -> None:
    proc = cli(*args, "--address", str(tmp_path / "nothing.sock"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1] == message
    assert proc.stderr.startswith("usage: bgpool ")
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("command", "words"),
    [
        ("start", ["NAME", "--scope", "--address", "without waiting"]),
        ("stop", ["NAME", "--scope", "--address", "grace period", "stay declared"]),
        ("scale", ["NAME", "NUM", "--scope", "--address", "highest indexes"]),
        ("status", ["Exits 0", "3 when one is not"]),
    ],
)
def test_cli_help(command: str, words: list[str]) -> None:
    proc = cli(command, "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for word in words:
        assert word in text, (command, word)
    top = cli("--help")
    assert command in top.stdout


# ----------------------------------------------------------- status exit code


def test_status_exits_3_while_an_instance_that_should_run_is_not_ready(
    make_pool: MakePool, sentinel_dir: Path
) -> None:
    pool = make_pool(
        [
            spec("web", "idle", num=1),
            spec("lazy", "idle"),  # never started: does not count
            spec("bad", "crash_at_boot", max_consecutive_failures=1),
        ]
    )
    proc = cli("status")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)

    pool.stop("web")  # an eager worker stopped on purpose is down all the same
    assert cli("status").returncode == 3
    assert cli("status", "--json").returncode == 3
    pool.start_workers("web")
    running(pool, "web", 1)
    assert cli("status").returncode == 0

    with pytest.raises(bgpool.WorkerAborted):
        pool.ensure("bad")  # a lazy worker that was started, and gave up
    proc = cli("status")
    assert proc.returncode == 3
    assert {r["WORKER"]: r["STATE"] for r in parse_table(proc.stdout)}["bad"] == "aborted"
    pool.stop("bad")  # stopped on purpose: a lazy worker no longer counts
    assert cli("status").returncode == 0

    pool.scale("web", 0)  # no longer eager: its stopped instance does not count
    assert cli("status").returncode == 0


def test_status_exits_3_for_one_instance_of_a_pool_not_ready(make_pool: MakePool) -> None:
    pool = make_pool([spec("web", "tenant", num=2, env={"HANG_INSTANCES": "1"})])
    assert states(pool, "web") == {0: "ready", 1: "starting"}  # start() waits for one
    proc = cli("status")
    assert proc.returncode == 3, (proc.stdout, proc.stderr)


# --------------------------------------------------------------- diagnostics


def test_diagnostics_text_says_what_it_knows(make_pool: MakePool) -> None:
    pool = make_pool(
        [spec("web", "idle", num=1),
         bgpool.WorkerSpec(name="flags", target="fixtures.faults:publisher", num=1)]
    )  # fmt: skip
    text = cli("diagnostics", "web").stdout
    assert "None" not in text, text
    assert "state:        ready\n" in text  # not "ready (was ready)"
    assert "last exit:    none yet\n" in text
    assert "vars:" not in text  # nothing published

    published(pool, "flags")
    generation = pool.diagnostics("flags").vars_generation
    assert generation >= 1
    text = cli("diagnostics", "flags").stdout
    line = next(line for line in text.splitlines() if line.startswith("vars:"))
    assert line.startswith(f"vars:         generation {generation}, published 20"), line

    pool.stop("web")
    text = cli("diagnostics", "web").stdout
    assert "state:        stopped (was ready)\n" in text
    assert "last exit:    0\n" in text
    assert "None" not in text, text
