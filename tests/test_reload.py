"""Pool.reload(config): new declarations for a running pool (SPEC, "Reload: new code
and new declarations take effect"): new ones added (eager ones ready when reload()
returns), removed ones drained and undeclared, changed ones restarted with their new
settings, unchanged ones left running; live pool settings; refused settings and
invalid configs that change nothing; and many reloads that leave no code generation
behind.

Worker code is generated into the test's own directory
(``fixtures/reload_fixtures.py``), on ``sys.path`` while the test runs.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import (
    Background,
    alive,
    fd_links,
    gone,
    published,
    read_text,
    since,
    state,
    statuses,
    supervisor_pid,
    the_status,
    wait_for,
)

import bgpool
from bgpool import PoolConfig, WorkerSpec
from fixtures.reload_fixtures import Sources, Start, starts

MakePool = Callable[..., Any]


def config(workers: list[WorkerSpec], **settings: Any) -> PoolConfig:
    """A PoolConfig with the suite's shorter defaults (as ``make_pool`` has them)."""
    settings.setdefault("grace_period", 5.0)
    settings.setdefault("ensure_timeout", 10.0)
    return PoolConfig(workers=workers, **settings)


def pid_of(pool: Any, name: str, scope: str = "") -> int:
    found = [s for s in pool.status() if s.name == name and s.scope == scope]
    assert len(found) == 1, found
    assert found[0].pid is not None, found[0]
    return int(found[0].pid)


def start_of(log: Path, pid: int) -> Start:
    found = [s for s in starts(log) if s.pid == pid]
    assert len(found) == 1, (pid, starts(log))
    return found[0]


def new_ready_pid(pool: Any, name: str, old: int, scope: str = "") -> int:
    """``name``'s pid once an instance other than ``old`` is ready."""

    def check() -> int | None:
        found = [s for s in pool.status() if s.name == name and s.scope == scope]
        if len(found) == 1 and found[0].pid not in (None, old):
            return int(found[0].pid) if state(found[0].state) == "ready" else None
        return None

    return wait_for(check, timeout=10, what=f"{name} running again with a new pid")


def ready_pids(pool: Any, name: str, count: int, exclude: list[int] | None = None) -> list[int]:
    """The pids of ``name``'s ``count`` instances, once each is ready (and none is
    one of ``exclude``)."""

    def check() -> list[int] | None:
        found = statuses(pool, name)
        if len(found) != count or any(state(s.state) != "ready" for s in found):
            return None
        pids = [int(s.pid) for s in sorted(found, key=lambda s: s.instance)]
        return None if set(pids) & set(exclude or []) else pids

    return wait_for(check, timeout=15, what=f"{count} ready instances of {name}")


def assert_undeclared(pool: Any, name: str, **kwargs: Any) -> None:
    text = f'no background worker configured for name "{name}"'
    with pytest.raises(bgpool.WorkerNotDeclared) as info:
        pool.ensure(name, timeout=2, **kwargs)
    assert text in str(info.value)
    with pytest.raises(bgpool.WorkerNotDeclared) as info:
        pool.diagnostics(name, **kwargs)
    assert text in str(info.value)
    with pytest.raises(bgpool.WorkerNotDeclared) as info:
        pool.get_vars(name, **kwargs)
    assert text in str(info.value)


# ------------------------------------------------------------- what a reload does


def test_reload_adds_removes_changes_and_keeps(
    make_pool: MakePool, sources: Sources, tmp_path: Path
) -> None:
    mod = sources.module("decl")
    logs = {n: tmp_path / f"{n}.log" for n in ("keep", "change", "gone", "lazy", "new", "newlazy")}

    def worker(name: str, num: int = 1, **env: str) -> WorkerSpec:
        return WorkerSpec(
            name=name, target=mod.target, num=num, env={"LOG": str(logs[name]), **env}
        )

    pool = make_pool(
        config=config([worker("keep"), worker("change", V="1"), worker("gone"), worker("lazy", 0)])
    )
    pool.ensure("lazy")
    keep0, change0, gone0, lazy0 = (pid_of(pool, n) for n in ("keep", "change", "gone", "lazy"))
    assert published(pool, "gone")["pid"] == gone0  # readable before the reload
    sources.edit(mod, "v2")  # a reload starts a new generation: what it restarts runs v2

    report = pool.reload(
        config(
            [
                worker("keep"),
                worker("change", V="2"),
                worker("lazy", 0),
                worker("new"),
                worker("newlazy", 0),
            ]
        )
    )

    assert isinstance(report, bgpool.ReloadReport)
    assert sorted(report.added) == ["new", "newlazy"], report
    assert report.removed == ["gone"], report
    assert report.changed == ["change"], report
    assert sorted(report.unchanged) == ["keep", "lazy"], report

    # added: the eager one is ready when reload() returns, the lazy one waits for ensure()
    new = the_status(pool, "new")
    assert state(new.state) == "ready", new
    assert new.pid is not None
    assert start_of(logs["new"], new.pid).version == "v2"
    newlazy = the_status(pool, "newlazy")
    assert state(newlazy.state) == "stopped", newlazy
    assert starts(logs["newlazy"]) == []
    pool.ensure("newlazy", timeout=5)
    assert start_of(logs["newlazy"], pid_of(pool, "newlazy")).version == "v2"

    # unchanged: the same processes, on the code they started with
    assert pid_of(pool, "keep") == keep0
    assert pid_of(pool, "lazy") == lazy0
    assert [s.pid for s in starts(logs["keep"])] == [keep0]
    assert [s.pid for s in starts(logs["lazy"])] == [lazy0]

    # changed: restarted with the new settings (and the new code)
    change1 = new_ready_pid(pool, "change", change0)
    assert start_of(logs["change"], change1) == Start(change1, "v2", "2", 0)
    wait_for(lambda: gone(change0), what="the changed worker's old instance gone")

    # removed: drained, then undeclared everywhere
    wait_for(lambda: gone(gone0), what="the removed worker drained")
    assert_undeclared(pool, "gone")
    wait_for(
        lambda: "gone" not in {s.name for s in pool.status()},
        what="the removed worker out of status()",
    )


def test_reload_labels_name_scoped_declarations(
    make_pool: MakePool, sources: Sources, tmp_path: Path
) -> None:
    mod = sources.module("scoped")
    api = bgpool.next_scope("api")
    log = tmp_path / "w.log"

    def env(v: str) -> dict[str, str]:
        return {"LOG": str(log), "V": v}

    pool = make_pool(
        config=config(
            [
                WorkerSpec(name="svc", target=mod.target, num=1, scope=api, env=env("1")),
                WorkerSpec(target=mod.target, scope=api, env=env("tenant")),
            ]
        )
    )
    svc0 = pid_of(pool, "svc", "api")
    pool.ensure("t0", scope=api)
    t0 = pid_of(pool, "t0", "api")

    report = pool.reload(
        config(
            [
                WorkerSpec(name="svc", target=mod.target, num=1, scope=api, env=env("2")),
                WorkerSpec(name="svc", target=mod.target, num=1, env=env("global")),
                WorkerSpec(target=mod.target, env=env("global-tenant")),
            ]
        )
    )

    assert report.changed == ["api:svc"], report
    assert report.removed == ["api:*"], report
    assert sorted(report.added) == ["*", "svc"], report
    assert report.unchanged == [], report
    svc1 = new_ready_pid(pool, "svc", svc0, "api")
    assert start_of(log, svc1).v == "2"
    found = [s for s in statuses(pool, "svc") if s.scope == ""]
    assert len(found) == 1 and state(found[0].state) == "ready", found
    wait_for(lambda: gone(t0), what="the removed catch-all's instance drained")
    with pytest.raises(bgpool.WorkerNotDeclared):  # api still declares svc: no fallback
        pool.ensure("t0", scope=api, timeout=2)
    pool.ensure("t1", timeout=5)  # the added global catch-all hosts names
    assert start_of(log, pid_of(pool, "t1")).v == "global-tenant"


def test_reload_restarts_a_changed_pool_rolling(
    make_pool: MakePool, sources: Sources, tmp_path: Path
) -> None:
    mod = sources.module("pool")
    log = tmp_path / "p.log"

    def pool_of(v: str) -> WorkerSpec:
        env = {"LOG": str(log), "V": v, "BOOT_DELAY": "0.15"}
        return WorkerSpec(name="p", target=mod.target, num=3, env=env)

    pool = make_pool(config=config([pool_of("1")]))
    old = ready_pids(pool, "p", 3)
    stop = threading.Event()
    samples: list[int] = []

    def sample() -> None:
        while not stop.is_set():
            samples.append(sum(1 for s in statuses(pool, "p") if state(s.state) == "ready"))

    sampler = Background(sample)
    try:
        report = pool.reload(config([pool_of("2")]))
        new = ready_pids(pool, "p", 3, exclude=old)
    finally:
        stop.set()
        sampler.wait(5, "the sampler")
    assert report.changed == ["p"], report
    assert sampler.error is None, sampler.error
    assert min(samples) >= 2, f"ready count fell to {min(samples)} during the reload"
    assert 2 in samples, "the sampler never saw an instance being replaced"
    assert sorted(start_of(log, p).instance for p in new) == [0, 1, 2]
    assert {start_of(log, p).v for p in new} == {"2"}


# ------------------------------------------------------------------ pool settings


def test_reload_changes_live_settings(
    make_pool: MakePool, sources: Sources, tmp_path: Path
) -> None:
    mod = sources.module("settings")
    record1, record2 = tmp_path / "big1.txt", tmp_path / "big2.txt"

    def big(name: str, record: Path) -> WorkerSpec:
        env = {"BAD": '{"blob": "x" * 5000}', "RECORD": str(record)}
        return WorkerSpec(name=name, target="fixtures.vars_workers:publish_refused", env=env)

    workers = [
        WorkerSpec(name="nr", target="fixtures.workers:never_ready"),
        WorkerSpec(name="stubborn", target=mod.target, num=1, env={"IGNORE_DRAIN": "1"}),
        WorkerSpec(name="doomed", target=mod.target, num=1, env={"IGNORE_DRAIN": "1"}),
        big("big1", record1),
        big("big2", record2),
    ]
    pool = make_pool(
        config=config(workers, ensure_timeout=10.0, grace_period=20.0, restart_grace_period=20.0)
    )
    pool.ensure("big1")
    assert wait_for(lambda: read_text(record1), what="big1's outcome") == "published"

    report = pool.reload(
        config(
            workers,
            ensure_timeout=1.0,
            grace_period=0.3,
            restart_grace_period=0.3,
            max_vars_bytes=1000,
        )
    )
    assert sorted(report.unchanged) == ["big1", "big2", "doomed", "nr", "stubborn"], report
    assert report.added == report.removed == report.changed == [], report

    # ensure_timeout: the default deadline of ensure()
    t0 = time.monotonic()
    with pytest.raises(bgpool.EnsureTimeout) as info:
        pool.ensure("nr")
    assert re.search(r"within 1(\.0)?s", str(info.value)), str(info.value)
    assert since(t0) < 3.0

    # max_vars_bytes: what a worker started afterwards may publish
    pool.ensure("big2")
    outcome = wait_for(lambda: read_text(record2), what="big2's outcome")
    assert outcome.startswith("ValueError"), outcome
    assert "1000" in outcome, outcome

    # restart_grace_period: a worker that ignores its drain is killed after 0.3 s + 1 s
    stubborn0 = pid_of(pool, "stubborn")
    t0 = time.monotonic()
    pool.restart_workers(["stubborn"])
    assert since(t0) < 5.0, f"restart took {since(t0):.1f}s: the old restart_grace_period"
    assert pid_of(pool, "stubborn") != stubborn0

    # grace_period: what a removed worker gets
    doomed = pid_of(pool, "doomed")
    t0 = time.monotonic()
    report = pool.reload(
        config(
            [w for w in workers if w.name != "doomed"],
            ensure_timeout=1.0,
            grace_period=0.3,
            restart_grace_period=0.3,
            max_vars_bytes=1000,
        )
    )
    assert report.removed == ["doomed"], report
    wait_for(lambda: gone(doomed), timeout=8, what="the removed worker killed")
    assert since(t0) < 5.0, f"removal took {since(t0):.1f}s: the old grace_period"


@pytest.mark.parametrize("field", ["start_method", "metrics_port", "metrics_host"])
def test_reload_refuses_settings_that_cannot_change_live(
    make_pool: MakePool, sources: Sources, tmp_path: Path, field: str
) -> None:
    mod = sources.module("refused")
    log = tmp_path / "a.log"

    def a(v: str) -> WorkerSpec:
        return WorkerSpec(name="a", target=mod.target, num=1, env={"LOG": str(log), "V": v})

    extra = WorkerSpec(name="extra", target=mod.target, num=1)
    before = config([a("1")])
    pool = make_pool(config=before)
    a0 = pid_of(pool, "a")
    other: dict[str, Any] = {
        "start_method": "spawn" if before.start_method == "fork" else "fork",
        "metrics_port": 0,
        "metrics_host": "127.0.0.2",
    }

    with pytest.raises(ValueError, match=field):
        pool.reload(config([a("2"), extra], **{field: other[field]}))

    # nothing changed: not the changed worker, not the added one
    assert pid_of(pool, "a") == a0
    assert [s.pid for s in starts(log)] == [a0]
    with pytest.raises(bgpool.WorkerNotDeclared):
        pool.ensure("extra", timeout=2)
    # the same changes without the refused setting do apply
    report = pool.reload(config([a("2"), extra]))
    assert report.changed == ["a"] and report.added == ["extra"], report
    assert start_of(log, new_ready_pid(pool, "a", a0)).v == "2"


# ----------------------------------------------------------------- invalid configs


@pytest.mark.parametrize("how", ["changed", "added"])
def test_reload_whose_new_code_fails_to_import_changes_nothing(
    make_pool: MakePool, sources: Sources, tmp_path: Path, how: str
) -> None:
    good, bad = sources.module("good"), sources.module("bad")
    sources.break_(bad, "import")  # exists (so the PoolConfig builds), fails to import
    log = tmp_path / "a.log"
    a = WorkerSpec(name="a", target=good.target, num=1, env={"LOG": str(log)})
    extra = WorkerSpec(name="extra", target=good.target, num=1)
    pool = make_pool(config=config([a]))
    a0 = pid_of(pool, "a")

    if how == "changed":
        new = [a.model_copy(update={"target": bad.target}), extra]
        name = "a"
    else:
        new = [a, extra, WorkerSpec(name="broken", target=bad.target, num=1)]
        name = "broken"
    with pytest.raises(bgpool.WorkerBootFailed) as info:
        pool.reload(config(new))
    assert f'"{name}"' in str(info.value), str(info.value)

    # the old instance keeps serving, and nothing of the new config was applied
    st = the_status(pool, "a")
    assert st.pid == a0 and state(st.state) == "ready", st
    assert alive(a0)
    assert [s.pid for s in starts(log)] == [a0]
    pool.ensure("a", timeout=2)
    with pytest.raises(bgpool.WorkerNotDeclared):
        pool.ensure("extra", timeout=2)
    if how == "added":
        with pytest.raises(bgpool.WorkerNotDeclared):
            pool.ensure("broken", timeout=2)


@pytest.mark.parametrize("argument", [None, {"workers": []}, "config.py", []], ids=repr)
def test_reload_of_something_else_than_a_pool_config(
    make_pool: MakePool, sources: Sources, argument: Any
) -> None:
    mod = sources.module("typed")
    pool = make_pool(config=config([WorkerSpec(name="a", target=mod.target, num=1)]))
    a0 = pid_of(pool, "a")
    with pytest.raises(TypeError):
        pool.reload(argument)
    assert pid_of(pool, "a") == a0
    assert state(the_status(pool, "a").state) == "ready"


# ---------------------------------------------------------------------------- churn


def generations(pool: Any) -> set[int]:
    """The numbers of the live code generations (processes ``bgpool-gen<N>``)
    among the supervisor's children, workers excluded. Numbers, not processes:
    a generation's spare is named after it until it renames itself."""
    sup = psutil.Process(supervisor_pid(pool))
    workers = {s.pid for s in pool.status() if s.pid}
    out = set()
    for child in sup.children():
        if child.pid in workers:
            continue
        try:
            with open(f"/proc/{child.pid}/comm", encoding="utf-8") as f:
                comm = f.read().strip()
            found = re.fullmatch(r"bgpool-gen(\d+)", comm)
            if found and child.status() != psutil.STATUS_ZOMBIE:
                out.add(int(found[1]))
        except (OSError, psutil.Error):
            continue
    return out


@pytest.mark.timeout(180)
def test_many_reloads_and_restarts_leave_no_generation_behind(
    make_pool: MakePool, sources: Sources, tmp_path: Path
) -> None:
    mod = sources.module("churn")
    log = tmp_path / "w.log"

    def workers(v: str) -> list[WorkerSpec]:
        return [
            WorkerSpec(name="w", target=mod.target, num=1, env={"LOG": str(log), "V": v}),
            WorkerSpec(name="p", target=mod.target, num=2),
            WorkerSpec(name="lazy", target=mod.target),
        ]

    pool = make_pool(config=config(workers("start"), start_method="fork"))
    sup = supervisor_pid(pool)
    assert len(generations(pool)) >= 1, "no bgpool-gen<N> process: cannot count generations"
    most = 0
    fds_at_10 = 0
    for i in range(100):
        if i % 2 == 0:
            report = pool.reload(config(workers(str(i)), start_method="fork"))
            assert report.changed == ["w"], (i, report)
        else:
            pool.restart_workers()
        most = max(most, len(generations(pool)))
        wait_for(
            lambda: len(generations(pool)) <= 2,
            timeout=5,
            what=f"at most two generations after round {i}",
        )
        if i == 10:
            fds_at_10 = len(fd_links(sup))
    assert most <= 3, f"{most} generations alive at once"  # a third may be on its way out
    wait_for(lambda: len(generations(pool)) <= 2, what="at most two generations at the end")
    assert len(fd_links(sup)) <= fds_at_10 + 4, "the supervisor keeps descriptors per generation"
    w = the_status(pool, "w")
    assert state(w.state) == "ready" and start_of(log, int(w.pid or 0)).v == "98", w
    assert all(state(s.state) == "ready" for s in statuses(pool, "p"))
    assert state(the_status(pool, "lazy").state) == "stopped"
