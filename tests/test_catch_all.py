"""Catch-all declarations (``WorkerSpec(name=None)``): one instance per ensured name,
each with its own process, readiness, table slot and diagnostics; the
``max_instances`` cap (exact message, nothing started past it, nothing started by a
batch that would exceed it); the place an aborted instance frees; concurrent
``ensure()`` of many names from threads, from other processes through
``bgpool.connect()`` and from inside a worker (README, "Catch-alls, pools and
scopes").
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    ROOT,
    TENANT,
    Background,
    failing,
    gone,
    last_json_line,
    names_in_log,
    read_json,
    run_python,
    run_together,
    since,
    spec,
    state,
    statuses,
    subprocess_env,
    tenant_log,
    tenant_report,
    the_status,
    wait_for,
    worker_pids,
)

import bgpool


def limit_message(name: str, cap: int) -> str:
    return (
        f'cannot start background worker "{name}": limit of {cap} reached '
        "(raise max_instances or declare it as a named worker)"
    )


def catch_all(sentinel_dir: Path, **kwargs: Any) -> bgpool.WorkerSpec:
    """A global catch-all running ``tenant``, logging to ``sentinel_dir/log`` and
    reporting into ``sentinel_dir``; ``env`` entries are added to those."""
    env = {"LOG": str(sentinel_dir / "log"), "REPORT_DIR": str(sentinel_dir)}
    env.update(kwargs.pop("env", {}))
    return spec(None, "tenant", env=env, **kwargs)


# ------------------------------------------------------------ hosting names


def test_catch_all_hosts_two_names_in_two_processes(make_pool: Any, sentinel_dir: Path) -> None:
    pool = make_pool(
        [catch_all(sentinel_dir, env={"REPORT_KEYS": "BGPOOL_WORKER,OWN", "OWN": "shared"})]
    )
    assert pool.status() == []  # a catch-all starts nothing by itself
    assert worker_pids() == set()

    pool.ensure("tenant-1", timeout=5)
    pool.ensure("tenant-2", timeout=5)

    reports = {
        n: wait_for(functools.partial(tenant_report, sentinel_dir, n), what=f"{n} report")
        for n in ("tenant-1", "tenant-2")
    }
    pids = {n: r["pid"] for n, r in reports.items()}
    assert pids["tenant-1"] != pids["tenant-2"]
    for n, r in reports.items():
        assert r["worker"] == {"name": n, "scope": "", "instance": 0}, r["worker"]
        assert r["BGPOOL_WORKER"] == n
        assert r["env"] == {"BGPOOL_WORKER": n, "OWN": "shared"}
        st = the_status(pool, n)
        assert st.pid == r["pid"]
        assert state(st.state) == "ready"
        assert st.ever_ready is True
        assert st.scope == ""
        assert st.instance == 0
        diag = pool.diagnostics(n)
        assert diag.name == n
        assert diag.scope == ""
        assert diag.target == TENANT
        assert state(diag.state) == "ready"
        assert [i.pid for i in diag.instances] == [r["pid"]]
        assert [i.name for i in diag.instances] == [n]
    assert {s.name for s in pool.status()} == {"tenant-1", "tenant-2"}
    assert worker_pids() == set(pids.values())

    # ensuring a hosted name again starts nothing
    pool.ensure(["tenant-1", "tenant-2"], timeout=5)
    assert sorted(names_in_log(sentinel_dir / "log")) == ["tenant-1", "tenant-2"]
    assert worker_pids() == set(pids.values())


def test_each_catch_all_name_has_its_own_readiness(make_pool: Any, sentinel_dir: Path) -> None:
    pool = make_pool([catch_all(sentinel_dir, env={"HANG_NAMES": "stuck"})], grace_period=0.2)
    waiter = Background(lambda: pool.ensure("stuck", timeout=1))
    try:
        wait_for(lambda: "stuck" in names_in_log(sentinel_dir / "log"), what="stuck started")
        t0 = time.monotonic()
        pool.ensure("fine", timeout=5)  # not held up by the stuck name
        assert since(t0) < 1.0
        assert not waiter.done.is_set()  # still waiting for "stuck"
    finally:
        waiter.wait(10, 'ensure("stuck")')
    exc = waiter.error
    assert isinstance(exc, bgpool.EnsureTimeout), repr(exc)
    assert str(exc) == 'background worker "stuck" did not call get_worker_handle() within 1s'
    assert exc.diagnostics.name == "stuck"
    assert state(the_status(pool, "fine").state) == "ready"
    stuck = the_status(pool, "stuck")
    assert state(stuck.state) == "starting"
    assert stuck.ever_ready is False
    assert stuck.pid is not None


def test_named_declaration_wins_over_catch_all_and_is_not_counted(
    make_pool: Any, sentinel_dir: Path
) -> None:
    pool = make_pool(
        [
            spec(
                "billing",
                "tenant",
                env={"REPORT_DIR": str(sentinel_dir), "REPORT_KEYS": "ROLE", "ROLE": "named"},
            ),
            catch_all(
                sentinel_dir, max_instances=1, env={"REPORT_KEYS": "ROLE", "ROLE": "catch-all"}
            ),
        ]
    )
    pool.ensure("billing", timeout=5)
    report = wait_for(lambda: tenant_report(sentinel_dir, "billing"), what="billing report")
    assert report["env"] == {"ROLE": "named"}
    assert names_in_log(sentinel_dir / "log") == []  # the catch-all's LOG: not used
    # the named worker took no place of the catch-all (cap 1)
    pool.ensure("tenant-1", timeout=5)
    report = wait_for(lambda: tenant_report(sentinel_dir, "tenant-1"), what="tenant-1 report")
    assert report["env"] == {"ROLE": "catch-all"}
    with pytest.raises(bgpool.CatchAllLimitReached) as info:
        pool.ensure("tenant-2", timeout=5)
    assert str(info.value) == limit_message("tenant-2", 1)


def test_catch_all_instance_restarts_under_its_name_after_a_crash(
    make_pool: Any, sentinel_dir: Path
) -> None:
    log = sentinel_dir / "log"
    pool = make_pool([catch_all(sentinel_dir)])
    pool.ensure(["tenant-1", "tenant-2"], timeout=5)
    old = {n: the_status(pool, n).pid for n in ("tenant-1", "tenant-2")}
    os.kill(old["tenant-1"], signal.SIGKILL)
    wait_for(lambda: names_in_log(log).count("tenant-1") == 2, what="tenant-1 respawned")
    new = [pid for pid, name, _, _, _ in tenant_log(log) if name == "tenant-1"][-1]
    assert new != old["tenant-1"]
    wait_for(
        lambda: (
            the_status(pool, "tenant-1").pid == new
            and state(the_status(pool, "tenant-1").state) == "ready"
        ),
        what="tenant-1 ready again",
    )
    diag = pool.diagnostics("tenant-1")
    assert diag.last_signal == "SIGKILL"
    assert diag.attempts == 2
    # the other name was not touched
    assert the_status(pool, "tenant-2").pid == old["tenant-2"]
    assert pool.diagnostics("tenant-2").attempts == 1
    assert names_in_log(log).count("tenant-2") == 1


def test_drains_reach_every_catch_all_instance(make_pool: Any, sentinel_dir: Path) -> None:
    log, eof = sentinel_dir / "log", sentinel_dir / "eof"
    names = ["t-a", "t-b", "t-c"]
    pool = make_pool(
        [catch_all(sentinel_dir, env={"EOF_LOG": str(eof)})],
        grace_period=30.0,
        restart_grace_period=30.0,
    )
    pool.ensure(names, timeout=5)
    old = {n: the_status(pool, n).pid for n in names}
    t0 = time.monotonic()
    pool.restart_workers()
    assert since(t0) < 3.0  # only the drain's EOF can make this fast
    assert {(pid, name) for pid, name, _, _, _ in tenant_log(eof)} == {(old[n], n) for n in names}
    wait_for(
        lambda: all(
            (st := the_status(pool, n)).pid not in (None, old[n]) and state(st.state) == "ready"
            for n in names
        ),
        what="every catch-all name respawned under its name",
    )
    assert Counter(names_in_log(log)) == dict.fromkeys(names, 2)
    new = {n: the_status(pool, n).pid for n in names}
    pool.ensure(names, timeout=1)
    t0 = time.monotonic()
    pool.shutdown()
    assert since(t0) < 3.0
    assert {(pid, name) for pid, name, _, _, _ in tenant_log(eof)} == {
        (old[n], n) for n in names
    } | {(new[n], n) for n in names}
    assert all(gone(p) for p in new.values())


# ------------------------------------------------------------------- the cap


def test_catch_all_cap_refuses_the_next_name_and_starts_nothing(
    make_pool: Any, sentinel_dir: Path
) -> None:
    log = sentinel_dir / "log"
    pool = make_pool([catch_all(sentinel_dir, max_instances=2)])
    pool.ensure("tenant-1", timeout=5)
    pool.ensure("tenant-2", timeout=5)
    hosted = worker_pids()
    assert len(hosted) == 2
    for _ in range(2):  # refused every time: no phantom entry, no half-started instance
        with pytest.raises(bgpool.CatchAllLimitReached) as info:
            pool.ensure("tenant-3", timeout=5)
        assert str(info.value) == limit_message("tenant-3", 2)
        assert isinstance(info.value, bgpool.BgpoolError)
        assert statuses(pool, "tenant-3") == []
        assert "tenant-3" not in names_in_log(log)
        assert worker_pids() == hosted
    # names already hosted are still served at the cap
    pool.ensure(["tenant-2", "tenant-1"], timeout=5)
    assert sorted(names_in_log(log)) == ["tenant-1", "tenant-2"]


def test_default_cap_is_sixteen(make_pool: Any, sentinel_dir: Path) -> None:
    log = sentinel_dir / "log"
    pool = make_pool([catch_all(sentinel_dir)])
    names = [f"t{i:02d}" for i in range(16)]
    pool.ensure(names, timeout=10)
    assert sorted(names_in_log(log)) == names
    assert len(worker_pids()) == 16
    with pytest.raises(bgpool.CatchAllLimitReached) as info:
        pool.ensure("t16", timeout=5)
    assert str(info.value) == limit_message("t16", 16)
    assert "t16" not in names_in_log(log)
    assert len(worker_pids()) == 16
    assert sorted(s.name for s in pool.status()) == names


def test_batch_that_would_exceed_the_cap_starts_nothing(make_pool: Any, sentinel_dir: Path) -> None:
    log = sentinel_dir / "log"
    named_starts = sentinel_dir / "named.log"
    pool = make_pool(
        [
            catch_all(sentinel_dir, max_instances=2),
            spec("named", "tenant", env={"LOG": str(named_starts)}),
        ]
    )
    with pytest.raises(bgpool.CatchAllLimitReached) as info:
        pool.ensure(["named", "t1", "t2", "t3"], timeout=5)
    assert str(info.value) in {limit_message(n, 2) for n in ("t1", "t2", "t3")}, str(info.value)
    assert names_in_log(log) == []
    assert tenant_log(named_starts) == []  # the named worker in the batch: not started either
    assert state(the_status(pool, "named").state) == "stopped"
    assert {s.name for s in pool.status()} == {"named"}
    assert worker_pids() == set()

    pool.ensure("t1", timeout=5)
    # one place left: two new names do not fit, and neither is started
    with pytest.raises(bgpool.CatchAllLimitReached) as info:
        pool.ensure(["t2", "t3"], timeout=5)
    assert str(info.value) in {limit_message(n, 2) for n in ("t2", "t3")}, str(info.value)
    assert names_in_log(log) == ["t1"]
    assert len(worker_pids()) == 1
    # a hosted name plus one new name fits
    pool.ensure(["t1", "t2", "named"], timeout=5)
    assert sorted(names_in_log(log)) == ["t1", "t2"]
    assert len(tenant_log(named_starts)) == 1


# ------------------------------------------------------------------ aborts


@pytest.fixture
def failing_t(make_pool: Any, sentinel_dir: Path) -> tuple[Any, Path, Path]:
    """A catch-all with one place (cap 1) where the name "t" fails to boot (aborted
    after 2 failures) while its flag is there: (pool, its log, the flag)."""
    fail = failing(sentinel_dir, "t")
    pool = make_pool(
        [catch_all(sentinel_dir, max_instances=1, max_consecutive_failures=2,
                   env={"FAIL_DIR": str(fail)})]
    )  # fmt: skip
    return pool, sentinel_dir / "log", fail / "t"


def test_aborted_catch_all_name_is_retried_afresh(failing_t: tuple[Any, Path, Path]) -> None:
    pool, log, flag = failing_t
    for attempts in (2, 4):
        with pytest.raises(bgpool.WorkerAborted) as info:
            pool.ensure("t", timeout=10)
        assert str(info.value).startswith(
            'background worker "t" failed to start: 2 consecutive failures '
            f"(last exit status 1, target {TENANT}): RuntimeError: boom t"
        ), str(info.value)
        assert info.value.diagnostics.name == "t"
        assert info.value.diagnostics.last_error.message == "boom t"
        assert names_in_log(log) == ["t"] * attempts

    flag.unlink()
    pool.ensure("t", timeout=10)
    st = the_status(pool, "t")
    assert state(st.state) == "ready"
    assert st.pid == tenant_log(log)[-1][0]
    assert names_in_log(log) == ["t"] * 5
    # it holds the only place again
    with pytest.raises(bgpool.CatchAllLimitReached):
        pool.ensure("u", timeout=5)


def test_aborted_catch_all_name_frees_its_place(failing_t: tuple[Any, Path, Path]) -> None:
    pool, log, _ = failing_t
    with pytest.raises(bgpool.WorkerAborted):
        pool.ensure("t", timeout=10)
    pool.ensure("u", timeout=5)  # cap 1: the aborted "t" holds no place
    assert state(the_status(pool, "u").state) == "ready"
    assert names_in_log(log) == ["t", "t", "u"]
    with pytest.raises(bgpool.CatchAllLimitReached) as info:
        pool.ensure("t", timeout=5)
    assert str(info.value) == limit_message("t", 1)


def test_fail_fast_on_a_catch_all_name(make_pool: Any, sentinel_dir: Path) -> None:
    fail = failing(sentinel_dir, "bad")
    pool = make_pool([catch_all(sentinel_dir, max_consecutive_failures=-1,
                                env={"FAIL_DIR": str(fail)})])  # fmt: skip
    t0 = time.monotonic()
    with pytest.raises(bgpool.WorkerBootFailed) as info:
        pool.ensure(["good", "bad"], timeout=20, fail_fast=True)
    assert since(t0) < 3.0
    assert str(info.value).startswith(
        'background worker "bad" failed to boot: attempt 1 failed '
        f"(exit status 1, target {TENANT}): RuntimeError: boom bad"
    ), str(info.value)


# -------------------------------------------------------------- concurrency


def _ensure_from_threads(pool: Any, calls: list[str]) -> dict[str, list[BaseException | None]]:
    """Ensure each name of ``calls`` from its own thread, all released at once; each
    name's outcomes (None for a call that returned)."""
    outcomes: dict[str, list[BaseException | None]] = {n: [] for n in calls}

    def call(name: str) -> None:
        try:
            pool.ensure(name, timeout=10)
        except BaseException as exc:
            outcomes[name].append(exc)
        else:
            outcomes[name].append(None)  # list.append is atomic: no lock needed

    assert run_together([functools.partial(call, n) for n in calls], timeout=20) == []
    return outcomes


def test_threads_ensuring_distinct_names_never_exceed_the_cap(
    make_pool: Any, sentinel_dir: Path
) -> None:
    log = sentinel_dir / "log"
    pool = make_pool([catch_all(sentinel_dir, env={"DELAY": "0.2"})])  # default cap 16
    names = [f"c{i:02d}" for i in range(24)]
    outcomes = _ensure_from_threads(pool, names)
    ok = {n for n, outs in outcomes.items() if outs == [None]}
    refused = {n for n, outs in outcomes.items() if n not in ok}
    assert len(ok) == 16, outcomes
    for n in refused:
        (exc,) = outcomes[n]
        assert isinstance(exc, bgpool.CatchAllLimitReached), exc
        assert str(exc) == limit_message(n, 16)
    entries = tenant_log(log)
    assert Counter(name for _, name, _, _, _ in entries) == dict.fromkeys(ok, 1)
    assert len({pid for pid, _, _, _, _ in entries}) == 16
    assert worker_pids() == {pid for pid, _, _, _, _ in entries}
    assert {s.name for s in pool.status()} == ok
    assert all(state(s.state) == "ready" for s in pool.status())


def test_threads_ensuring_overlapping_names_start_each_once(
    make_pool: Any, sentinel_dir: Path
) -> None:
    log = sentinel_dir / "log"
    pool = make_pool([catch_all(sentinel_dir, max_instances=16, env={"DELAY": "0.2"})])
    names = [f"o{i:02d}" for i in range(20)]
    outcomes = _ensure_from_threads(pool, names * 2)  # 40 threads, two per name
    ok = {n for n, outs in outcomes.items() if outs == [None, None]}
    for n, outs in outcomes.items():
        if n not in ok:  # refused: for both callers (the cap never frees here)
            assert all(isinstance(o, bgpool.CatchAllLimitReached) for o in outs), outs
    assert len(ok) == 16, outcomes
    assert Counter(names_in_log(log)) == dict.fromkeys(ok, 1)
    assert len(worker_pids()) == 16
    assert {s.name for s in pool.status()} == ok


CLIENT_THREADS = textwrap.dedent(
    """
    import json, sys, threading
    import bgpool

    names = sys.argv[1].split(",")
    n_threads = int(sys.argv[2])
    barrier = threading.Barrier(n_threads)
    lock = threading.Lock()
    outcomes = {n: [] for n in names}

    def run(share):
        client = bgpool.connect()
        barrier.wait()
        for n in share:
            try:
                client.ensure(n, timeout=10)
                out = "ok"
            except Exception as exc:
                out = f"{type(exc).__name__}: {exc}"
            with lock:
                outcomes[n].append(out)

    threads = [threading.Thread(target=run, args=(names[i::n_threads],))
               for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(outcomes))
    """
)


def test_clients_in_other_processes_respect_the_cap(make_pool: Any, sentinel_dir: Path) -> None:
    log = sentinel_dir / "log"
    pool = make_pool([catch_all(sentinel_dir, env={"DELAY": "0.1"})])  # default cap 16
    names = [f"p{i:02d}" for i in range(20)]
    env = subprocess_env()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLIENT_THREADS, ",".join(names[k:] + names[:k]), "8"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in (0, 7, 13)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        results.append(last_json_line(out))
    merged: dict[str, list[str]] = {n: [] for n in names}
    for result in results:
        for n, outs in result.items():
            merged[n].extend(outs)
    assert all(len(outs) == 3 for outs in merged.values()), merged
    ok = {n for n, outs in merged.items() if outs == ["ok"] * 3}
    for n, outs in merged.items():
        if n not in ok:
            assert outs == [f"CatchAllLimitReached: {limit_message(n, 16)}"] * 3, outs
    assert len(ok) == 16, merged
    assert Counter(names_in_log(log)) == dict.fromkeys(ok, 1)
    assert len(worker_pids()) == 16
    assert {s.name for s in pool.status()} == ok


def test_a_worker_ensuring_many_catch_all_names_respects_the_cap(
    make_pool: Any, sentinel_dir: Path
) -> None:
    log, result = sentinel_dir / "log", sentinel_dir / "result.json"
    names = [f"w{i:02d}" for i in range(12)]
    pool = make_pool(
        [
            catch_all(sentinel_dir, max_instances=8, env={"DELAY": "0.1"}),
            spec(
                "driver",
                "ensurer",
                env={"ENSURE": ",".join(names), "THREADS": "12", "RESULT": str(result)},
            ),
        ]
    )
    pool.ensure("driver", timeout=5)
    out = wait_for(lambda: read_json(result), timeout=20, what="the driver's result")
    outcomes = out["outcomes"]
    ok = {n for n, outs in outcomes.items() if outs == [{"ok": True}]}
    assert len(ok) == 8, outcomes
    for n, outs in outcomes.items():
        if n not in ok:
            assert outs == [
                {"ok": False, "type": "CatchAllLimitReached", "error": limit_message(n, 8)}
            ], outs
    assert Counter(names_in_log(log)) == dict.fromkeys(ok, 1)
    driver = the_status(pool, "driver").pid
    assert worker_pids() - {driver} == {pid for pid, *_ in tenant_log(log)}
    assert {s.name for s in pool.status()} == ok | {"driver"}
    # the worker's own client saw the same table
    assert {s["name"] for s in out["status"]} == ok | {"driver"}
    by_name = {s["name"]: s for s in out["status"]}
    assert all(by_name[n]["state"] == "ready" for n in ok)


def test_client_in_another_process_sees_catch_all_names(make_pool: Any, sentinel_dir: Path) -> None:
    pool = make_pool([catch_all(sentinel_dir, max_instances=1)])
    code = textwrap.dedent(
        """
        import json, bgpool
        client = bgpool.connect()
        out = {}
        client.ensure("tenant-1", timeout=5)
        out["status"] = [s.model_dump(mode="json") for s in client.status()]
        out["diag"] = client.diagnostics("tenant-1").model_dump(mode="json")
        try:
            client.ensure("tenant-2", timeout=5)
        except bgpool.CatchAllLimitReached as exc:
            out["limit"] = str(exc)
        print(json.dumps(out))
        """
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    out = last_json_line(proc.stdout)
    st = the_status(pool, "tenant-1")
    assert state(st.state) == "ready"
    assert [(s["name"], s["pid"], s["state"]) for s in out["status"]] == [
        ("tenant-1", st.pid, "ready")
    ]
    assert out["diag"]["name"] == "tenant-1"
    assert out["diag"]["target"] == TENANT
    assert [i["pid"] for i in out["diag"]["instances"]] == [st.pid]
    assert out["limit"] == limit_message("tenant-2", 1)
    assert statuses(pool, "tenant-2") == []
    assert json.dumps(out)  # JSON all the way
