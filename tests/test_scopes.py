"""Scopes: distinct scopes from ``next_scope()``, the same name in several scopes, a
catch-all serving only its own scope, and the order in which ``ensure()`` resolves a
name (the ``scope=`` argument, ``pool.request_scope(s)``, the calling worker's own
scope, the global scope; a scope that declares nothing falls back to the global one),
from the application, from another process and from inside a worker (README,
"Catch-alls, pools and scopes").
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import textwrap
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    last_json_line,
    read_json,
    run_python,
    run_together,
    spec,
    state,
    statuses,
    tenant_log,
    tenant_report,
    the_status,
    wait_for,
)

import bgpool
from bgpool import GLOBAL_SCOPE, next_scope


def undeclared(name: str) -> str:
    return f'no background worker configured for name "{name}"'


def started(log: Path, name: str = "dep") -> list[str]:
    """Scope labels of the instances of ``name`` started so far, in order."""
    return [scope for _, n, scope, _, _ in tenant_log(log) if n == name]


def by_scope(pool: Any, name: str) -> dict[str, Any]:
    rows = statuses(pool, name)
    out = {s.scope: s for s in rows}
    assert len(out) == len(rows), rows
    return out


# ------------------------------------------------------------ next_scope()


def test_next_scope_hands_out_a_fresh_scope_each_time() -> None:
    scopes = [next_scope() for _ in range(50)] + [next_scope("same") for _ in range(50)]
    assert len(set(scopes)) == 100
    assert GLOBAL_SCOPE not in scopes
    for a, b in itertools.pairwise(scopes):
        assert a != b
    assert next_scope("api.example.com") != next_scope("api.example.com")


@pytest.mark.parametrize("label", [":", "a:b", "api.example.com:443", "trailing:"])
def test_scope_label_with_a_colon_is_rejected(label: str) -> None:
    with pytest.raises(ValueError):
        next_scope(label)


# ----------------------------------------------------- one name, two scopes


@pytest.fixture
def scopes() -> tuple[bgpool.Scope, bgpool.Scope]:
    return next_scope("a"), next_scope("b")


def test_same_name_in_two_scopes_is_two_workers(
    make_pool: Any, sentinel_dir: Path, scopes: tuple[bgpool.Scope, bgpool.Scope]
) -> None:
    a, b = scopes
    log = sentinel_dir / "log"
    env = {"LOG": str(log), "REPORT_DIR": str(sentinel_dir), "REPORT_KEYS": "BGPOOL_WORKER"}
    pool = make_pool(
        [
            spec("job", "tenant", env=env),
            spec("job", "tenant", env=env, scope=a),
            spec("job", "tenant", env=env, scope=b),
        ]
    )
    assert set(by_scope(pool, "job")) == {"", "a", "b"}
    pool.ensure("job", scope=a, timeout=5)
    pool.ensure("job", scope=b, timeout=5)
    reports = {
        label: wait_for(
            functools.partial(tenant_report, sentinel_dir, "job", scope=label),
            what=f"job report in scope {label!r}",
        )
        for label in ("a", "b")
    }
    assert reports["a"]["pid"] != reports["b"]["pid"]
    for label, r in reports.items():
        assert r["worker"] == {"name": "job", "scope": label, "instance": 0}
        assert r["BGPOOL_WORKER"] == "job"
    assert sorted(started(log, "job")) == ["a", "b"]

    rows = by_scope(pool, "job")
    assert state(rows[""].state) == "stopped" and rows[""].pid is None
    for label in ("a", "b"):
        assert state(rows[label].state) == "ready"
        assert rows[label].pid == reports[label]["pid"]
    for s, label in ((a, "a"), (b, "b")):
        diag = pool.diagnostics("job", scope=s)
        assert diag.name == "job"
        assert diag.scope == label
        assert [(i.scope, i.pid) for i in diag.instances] == [(label, reports[label]["pid"])]
    glob = pool.diagnostics("job")
    assert glob.scope == ""
    assert state(glob.state) == "stopped"

    # each scope's worker is ensured on its own: the global one is still not started
    pool.ensure("job", scope=a, timeout=5)
    assert sorted(started(log, "job")) == ["a", "b"]
    pool.ensure("job", timeout=5)
    assert sorted(started(log, "job")) == ["", "a", "b"]


def test_eager_workers_of_the_same_name_start_in_every_scope(
    make_pool: Any, sentinel_dir: Path, scopes: tuple[bgpool.Scope, bgpool.Scope]
) -> None:
    a, b = scopes
    log = sentinel_dir / "log"
    pool = make_pool(
        [
            spec("job", "tenant", num=1, env={"LOG": str(log)}, scope=a),
            spec("job", "tenant", num=2, env={"LOG": str(log)}, scope=b),
        ]
    )
    # start() waits for the first ready instance of each name: wait for the rest
    wait_for(
        lambda: all(state(s.state) == "ready" for s in pool.status()), what="all instances ready"
    )
    assert sorted((scope, inst) for _, _, scope, inst, _ in tenant_log(log)) == [
        ("a", 0), ("b", 0), ("b", 1),
    ]  # fmt: skip
    rows = sorted((s.scope, s.instance, s.pid) for s in statuses(pool, "job"))
    assert [(scope, inst) for scope, inst, _ in rows] == [("a", 0), ("b", 0), ("b", 1)]
    assert len({pid for *_, pid in rows}) == 3


# ------------------------------------------------------------- catch-alls


def test_catch_all_serves_only_its_own_scope(
    make_pool: Any, sentinel_dir: Path, scopes: tuple[bgpool.Scope, bgpool.Scope]
) -> None:
    a, b = scopes
    log = sentinel_dir / "log"
    env = {"LOG": str(log), "REPORT_DIR": str(sentinel_dir)}
    pool = make_pool(
        [
            spec(None, "tenant", env=env, scope=a),
            spec("x", "tenant", env=env, scope=b),
            spec("y", "tenant", env=env),
        ]
    )
    pool.ensure("tenant-1", scope=a, timeout=5)
    report = wait_for(lambda: tenant_report(sentinel_dir, "tenant-1", scope="a"), what="report")
    assert report["worker"] == {"name": "tenant-1", "scope": "a", "instance": 0}
    assert [(s.name, s.scope) for s in statuses(pool, "tenant-1")] == [("tenant-1", "a")]
    assert pool.diagnostics("tenant-1", scope=a).scope == "a"

    for kwargs in ({"scope": b}, {}):  # scope b (named only) and the global scope
        with pytest.raises(bgpool.WorkerNotDeclared) as info:
            pool.ensure("tenant-2", timeout=5, **kwargs)
        assert str(info.value) == undeclared("tenant-2")
    # a name hosted in scope a is not visible from the others either
    with pytest.raises(bgpool.WorkerNotDeclared):
        pool.ensure("tenant-1", scope=b, timeout=5)
    with pytest.raises(bgpool.WorkerNotDeclared):
        pool.ensure("tenant-1", timeout=5)
    assert [name for _, name, *_ in tenant_log(log)] == ["tenant-1"]

    # a's catch-all hosts "y" under scope a; the global named "y" is another worker
    pool.ensure("y", scope=a, timeout=5)
    rows = by_scope(pool, "y")
    assert state(rows["a"].state) == "ready"
    assert state(rows[""].state) == "stopped"


def test_catch_alls_in_two_scopes_have_their_own_names_and_caps(
    make_pool: Any, sentinel_dir: Path, scopes: tuple[bgpool.Scope, bgpool.Scope]
) -> None:
    a, _ = scopes
    log = sentinel_dir / "log"
    pool = make_pool(
        [
            spec(None, "tenant", max_instances=1, env={"LOG": str(log)}),
            spec(None, "tenant", max_instances=1, env={"LOG": str(log)}, scope=a),
        ]
    )
    pool.ensure("t", timeout=5)
    pool.ensure("t", scope=a, timeout=5)  # the same name, the other scope's place
    rows = by_scope(pool, "t")
    assert set(rows) == {"", "a"}
    assert rows[""].pid != rows["a"].pid
    assert sorted(started(log, "t")) == ["", "a"]
    for kwargs, label in (({}, "global"), ({"scope": a}, "a")):
        with pytest.raises(bgpool.CatchAllLimitReached) as info:
            pool.ensure("u", timeout=5, **kwargs)
        assert str(info.value) == (
            'cannot start background worker "u": limit of 1 reached '
            "(raise max_instances or declare it as a named worker)"
        ), label
    assert statuses(pool, "u") == []


# ------------------------------------------------------------ resolution


@pytest.fixture
def resolution(
    make_pool: Any, sentinel_dir: Path, scopes: tuple[bgpool.Scope, bgpool.Scope]
) -> tuple[Any, Path]:
    """``dep`` declared in the global scope and in scopes a and b; ``only_global``
    declared in the global scope only."""
    a, b = scopes
    log = sentinel_dir / "log"
    env = {"LOG": str(log)}
    pool = make_pool(
        [
            spec("dep", "tenant", env=env),
            spec("dep", "tenant", env=env, scope=a),
            spec("dep", "tenant", env=env, scope=b),
            spec("only_global", "tenant", env=env),
        ]
    )
    return pool, log


def test_without_any_scope_the_global_scope_resolves(resolution: tuple[Any, Path]) -> None:
    pool, log = resolution
    pool.ensure("dep", timeout=5)
    assert started(log) == [""]
    assert state(by_scope(pool, "dep")[""].state) == "ready"


def test_scope_argument_resolves(
    resolution: tuple[Any, Path], scopes: tuple[bgpool.Scope, bgpool.Scope]
) -> None:
    pool, log = resolution
    a, _ = scopes
    pool.ensure("dep", scope=a, timeout=5)
    assert started(log) == ["a"]
    pool.ensure("dep", scope="b", timeout=5)  # a label names the one scope that has it
    assert started(log) == ["a", "b"]


def test_request_scope_resolves_and_is_restored(
    resolution: tuple[Any, Path], scopes: tuple[bgpool.Scope, bgpool.Scope]
) -> None:
    pool, log = resolution
    a, b = scopes
    with pool.request_scope(a):
        pool.ensure("dep", timeout=5)
        assert started(log) == ["a"]
        with pool.request_scope(b):
            pool.ensure("dep", timeout=5)
            assert started(log) == ["a", "b"]
        with pytest.raises(bgpool.WorkerNotDeclared):
            # back in a, which declares workers: no fallback to the global scope
            pool.ensure("only_global", timeout=5)
    pool.ensure("dep", timeout=5)  # outside: the global scope again
    assert started(log) == ["a", "b", ""]
    pool.ensure("only_global", timeout=5)


def test_scope_argument_beats_request_scope(
    resolution: tuple[Any, Path], scopes: tuple[bgpool.Scope, bgpool.Scope]
) -> None:
    pool, log = resolution
    a, b = scopes
    with pool.request_scope(a):
        pool.ensure("dep", scope=b, timeout=5)
        assert started(log) == ["b"]
        pool.ensure("dep", scope=GLOBAL_SCOPE, timeout=5)
        assert started(log) == ["b", ""]
    rows = by_scope(pool, "dep")
    assert state(rows["a"].state) == "stopped"


def test_a_scope_that_declares_nothing_falls_back_to_global(
    resolution: tuple[Any, Path],
) -> None:
    pool, log = resolution
    empty = next_scope("empty")
    pool.ensure("dep", scope=empty, timeout=5)
    assert started(log) == [""]
    with pool.request_scope(next_scope("empty-too")):
        pool.ensure(["dep", "only_global"], timeout=5)
    assert sorted(started(log, "only_global")) == [""]
    assert started(log) == [""]


def test_a_scope_with_declarations_does_not_fall_back_per_name(
    resolution: tuple[Any, Path], scopes: tuple[bgpool.Scope, bgpool.Scope]
) -> None:
    pool, log = resolution
    a, _ = scopes
    with pytest.raises(bgpool.WorkerNotDeclared) as info:
        pool.ensure("only_global", scope=a, timeout=5)
    assert str(info.value) == undeclared("only_global")
    with pytest.raises(bgpool.WorkerNotDeclared):
        pool.ensure(["dep", "only_global"], scope=a, timeout=5)
    assert tenant_log(log) == []  # the batch started nothing, not even a's dep


def test_request_scope_is_per_thread(
    resolution: tuple[Any, Path], scopes: tuple[bgpool.Scope, bgpool.Scope]
) -> None:
    pool, log = resolution
    a, b = scopes
    barrier = threading.Barrier(3)

    def in_scope(s: bgpool.Scope | None) -> None:
        if s is None:
            barrier.wait()
            barrier.wait()
            pool.ensure("dep", timeout=5)
            return
        with pool.request_scope(s):
            barrier.wait()  # every thread has entered its scope
            barrier.wait()
            pool.ensure("dep", timeout=5)

    with pool.request_scope(b):  # not inherited by the threads started here
        errors = run_together([functools.partial(in_scope, s) for s in (a, b, None)], 15)
    assert errors == []
    assert sorted(started(log)) == ["", "a", "b"]


def test_request_scope_is_per_asyncio_task(
    resolution: tuple[Any, Path], scopes: tuple[bgpool.Scope, bgpool.Scope]
) -> None:
    pool, log = resolution
    a, b = scopes
    order: list[str] = []

    async def request(s: bgpool.Scope, label: str, entered: asyncio.Event) -> None:
        with pool.request_scope(s):
            entered.set()
            await asyncio.sleep(0.05)  # let the other task enter its scope meanwhile
            pool.ensure("dep", timeout=5)
            order.append(label)

    async def main() -> None:
        ea, eb = asyncio.Event(), asyncio.Event()
        ta = asyncio.create_task(request(a, "a", ea))
        await ea.wait()
        tb = asyncio.create_task(request(b, "b", eb))
        await eb.wait()
        await asyncio.gather(ta, tb)

    asyncio.run(main())
    assert order == ["a", "b"]
    assert started(log) == ["a", "b"]


def test_concurrent_ensures_start_one_instance_per_scope(
    make_pool: Any, sentinel_dir: Path
) -> None:
    log = sentinel_dir / "log"
    labelled = [next_scope(f"s{i}") for i in range(4)]
    pool = make_pool(
        [spec("dep", "tenant", env={"LOG": str(log), "DELAY": "0.2"}, scope=s) for s in labelled]
    )
    calls = [functools.partial(pool.ensure, "dep", scope=s, timeout=10) for s in labelled * 4]
    assert run_together(calls, timeout=20) == []
    assert Counter(started(log)) == {f"s{i}": 1 for i in range(4)}
    assert all(state(s.state) == "ready" for s in pool.status())


# ------------------------------------------- from a worker, from another process


def test_a_worker_resolves_in_its_own_scope(
    make_pool: Any, sentinel_dir: Path, scopes: tuple[bgpool.Scope, bgpool.Scope]
) -> None:
    a, b = scopes
    log = sentinel_dir / "log"
    results = {k: sentinel_dir / f"{k}.json" for k in ("in_a", "in_global", "a_to_b", "only")}
    env = {"LOG": str(log)}
    pool = make_pool(
        [
            spec("dep", "tenant", env=env),
            spec("dep", "tenant", env=env, scope=a),
            spec("dep", "tenant", env=env, scope=b),
            spec("only_global", "tenant", env=env),
            spec("caller", "ensurer", scope=a,
                 env={"ENSURE": "dep", "RESULT": str(results["in_a"])}),
            spec("caller", "ensurer",
                 env={"ENSURE": "dep", "RESULT": str(results["in_global"])}),
            spec("caller_b", "ensurer", scope=a,
                 env={"ENSURE": "dep", "SCOPE": "b", "RESULT": str(results["a_to_b"])}),
            spec("caller_only", "ensurer", scope=a,
                 env={"ENSURE": "only_global", "RESULT": str(results["only"])}),
        ]
    )  # fmt: skip

    def outcome(key: str) -> Any:
        data = wait_for(lambda: read_json(results[key]), timeout=15, what=f"{key} result")
        return data["outcomes"]

    pool.ensure("caller", scope=a, timeout=5)
    assert outcome("in_a") == {"dep": [{"ok": True}]}
    assert started(log) == ["a"]  # the worker's own scope, not the global one

    pool.ensure("caller", timeout=5)
    assert outcome("in_global") == {"dep": [{"ok": True}]}
    assert started(log) == ["a", ""]

    pool.ensure("caller_b", scope=a, timeout=5)  # the argument beats the worker's scope
    assert outcome("a_to_b") == {"dep": [{"ok": True}]}
    assert started(log) == ["a", "", "b"]

    pool.ensure("caller_only", scope=a, timeout=5)
    assert outcome("only") == {
        "only_global": [
            {"ok": False, "type": "WorkerNotDeclared", "error": undeclared("only_global")}
        ]
    }
    assert started(log, "only_global") == []


def test_a_catch_all_instance_resolves_in_its_own_scope(
    make_pool: Any, sentinel_dir: Path, scopes: tuple[bgpool.Scope, bgpool.Scope]
) -> None:
    a, _ = scopes
    log, result = sentinel_dir / "log", sentinel_dir / "result.json"
    pool = make_pool(
        [
            spec("dep", "tenant", env={"LOG": str(log)}),
            spec("dep", "tenant", env={"LOG": str(log)}, scope=a),
            spec(None, "ensurer", scope=a, env={"ENSURE": "dep", "RESULT": str(result)}),
        ]
    )
    pool.ensure("tenant-9", scope=a, timeout=5)
    data = wait_for(lambda: read_json(result), timeout=15, what="the catch-all's result")
    assert data["outcomes"] == {"dep": [{"ok": True}]}
    assert started(log) == ["a"]
    rows = {(s["name"], s["scope"]): s["state"] for s in data["status"]}
    assert rows[("tenant-9", "a")] == "ready"
    assert rows[("dep", "a")] == "ready"
    assert rows[("dep", "")] == "stopped"


def test_client_in_another_process_resolves_scope_labels(
    make_pool: Any, sentinel_dir: Path, scopes: tuple[bgpool.Scope, bgpool.Scope]
) -> None:
    a, b = scopes
    log = sentinel_dir / "log"
    env = {"LOG": str(log)}
    pool = make_pool(
        [
            spec("dep", "tenant", env=env),
            spec("dep", "tenant", env=env, scope=a),
            spec("dep", "tenant", env=env, scope=b),
            spec(None, "tenant", env=env, scope=b),
        ]
    )
    code = textwrap.dedent(
        """
        import json, bgpool
        client = bgpool.connect()
        out = {}
        client.ensure("dep", scope="a", timeout=5)
        client.ensure(["dep", "tenant-1"], scope="b", timeout=5)
        try:
            client.ensure("tenant-2", timeout=5)
        except bgpool.WorkerNotDeclared as exc:
            out["undeclared"] = str(exc)
        out["status"] = [s.model_dump(mode="json") for s in client.status()]
        out["diag_a"] = client.diagnostics("dep", scope="a").model_dump(mode="json")
        out["diag_t"] = client.diagnostics("tenant-1", scope="b").model_dump(mode="json")
        print(json.dumps(out))
        """
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    out = last_json_line(proc.stdout)
    assert sorted(started(log)) == ["a", "b"]
    assert started(log, "tenant-1") == ["b"]
    assert out["undeclared"] == undeclared("tenant-2")
    rows = {(s["name"], s["scope"]): s for s in out["status"]}
    assert set(rows) == {("dep", ""), ("dep", "a"), ("dep", "b"), ("tenant-1", "b")}
    assert rows[("dep", "")]["state"] == "stopped"
    for key in (("dep", "a"), ("dep", "b"), ("tenant-1", "b")):
        assert rows[key]["state"] == "ready", key
    assert out["diag_a"]["scope"] == "a"
    assert out["diag_a"]["instances"][0]["pid"] == by_scope(pool, "dep")["a"].pid
    assert out["diag_t"]["scope"] == "b"
    assert out["diag_t"]["name"] == "tenant-1"
    assert the_status(pool, "tenant-1").scope == "b"
