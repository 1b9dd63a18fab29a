"""restart_workers() runs new code (SPEC, "Reload: new code and new declarations take
effect"): a new code generation imports the targets afresh, then running instances
are replaced (rolling in a pool); a crash restart keeps the code an instance started
with; a module that no longer imports leaves the old instances serving; a watched
file's change restarts its worker on new code, debounced.

Every worker here is generated into the test's own directory
(``fixtures/reload_fixtures.py``), which is put on ``sys.path`` before the pool
starts, so a test edits its workers' code while they run.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    Background,
    alive,
    gone,
    published,
    state,
    statuses,
    supervisor_pid,
    the_status,
    wait_for,
)

import bgpool
from bgpool import WorkerSpec
from fixtures.reload_fixtures import IMPORT_ERROR_TEXT, Broken, Sources, Start, starts

MakePool = Callable[..., Any]


def pid_of(pool: Any, name: str, **kwargs: Any) -> int:
    """The pid of ``name``'s single instance (in ``scope``'s label if given)."""
    scope = kwargs.get("scope", "")
    found = [s for s in pool.status() if s.name == name and s.scope == scope]
    assert len(found) == 1, found
    pid = found[0].pid
    assert pid is not None, found[0]
    return int(pid)


def start_of(log: Path, pid: int) -> Start:
    """The logged attempt of ``pid`` (it logs before taking its handle)."""
    found = [s for s in starts(log) if s.pid == pid]
    assert len(found) == 1, (pid, starts(log))
    return found[0]


def ready_pids(pool: Any, name: str, count: int) -> list[int]:
    """The pids of ``name``'s ``count`` instances, once every one is ready."""

    def check() -> list[int] | None:
        found = statuses(pool, name)
        if len(found) == count and all(state(s.state) == "ready" for s in found):
            return [int(s.pid) for s in sorted(found, key=lambda s: s.instance)]
        return None

    return wait_for(check, timeout=10, what=f"{count} ready instances of {name}")


def replaced(pool: Any, name: str, old: int) -> int:
    """``name``'s new pid, once an instance other than ``old`` is ready."""

    def check() -> int | None:
        st = the_status(pool, name)
        ok = st.pid is not None and st.pid != old and state(st.state) == "ready"
        return int(st.pid) if ok else None

    return wait_for(check, timeout=10, what=f"{name} running again with a new pid")


def stays(holds: Callable[[], bool], seconds: float, what: str) -> None:
    """Fail as soon as ``holds()`` is false, watching it for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert holds(), what
        time.sleep(0.02)
    assert holds(), what


def assert_children_of_supervisor(pool: Any, pids: list[int]) -> None:
    sup = supervisor_pid(pool)
    for pid in pids:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        assert ppid == sup, f"worker {pid} is a child of {ppid}, not of the supervisor {sup}"


# ------------------------------------------------------------------- new code runs


def test_edited_module_runs_after_restart(
    make_pool: MakePool, sources: Sources, tmp_path: Path
) -> None:
    mod = sources.module("edited")
    log = tmp_path / "a.log"
    pool = make_pool([WorkerSpec(name="a", target=mod.target, num=1, env={"LOG": str(log)})])
    old = pid_of(pool, "a")
    assert start_of(log, old).version == "v1"
    assert published(pool, "a")["version"] == "v1"

    sources.edit(mod, "v2")
    pool.restart_workers()

    new = pid_of(pool, "a")
    assert new != old
    assert state(the_status(pool, "a").state) == "ready"  # ready when restart_workers returns
    assert start_of(log, new).version == "v2", starts(log)
    assert wait_for(lambda: gone(old), what="the old instance gone")
    assert_children_of_supervisor(pool, [new])
    assert wait_for(lambda: published(pool, "a")["version"] == "v2", what="v2's vars")


def test_edited_script_runs_after_restart(
    make_pool: MakePool, sources: Sources, tmp_path: Path
) -> None:
    script = sources.script("svc")
    log = tmp_path / "s.log"
    pool = make_pool([WorkerSpec(name="s", target=script.target, num=1, env={"LOG": str(log)})])
    old = pid_of(pool, "s")
    assert start_of(log, old).version == "v1"

    sources.edit(script, "v2-script")
    pool.restart_workers()

    new = pid_of(pool, "s")
    assert new != old
    assert start_of(log, new).version == "v2-script", starts(log)


def test_same_second_same_size_edit_runs_after_restart(
    make_pool: MakePool, sources: Sources, tmp_path: Path
) -> None:
    """The one case that depends on more than Python's .pyc check: an edit of the
    same size whose mtime stays in the whole second the old code was compiled in."""
    mod = sources.module("quick")
    sources.at_whole_second(mod)  # v1 compiled (and cached) with this mtime
    log = tmp_path / "q.log"
    pool = make_pool([WorkerSpec(name="q", target=mod.target, num=1, env={"LOG": str(log)})])
    old = pid_of(pool, "q")
    size = mod.path.stat().st_size

    sources.edit(mod, "v2", same_second=True)
    assert mod.path.stat().st_size == size
    pool.restart_workers()

    new = pid_of(pool, "q")
    assert new != old
    assert start_of(log, new).version == "v2", starts(log)


@pytest.mark.parametrize("start_method", ["fork"])
def test_crash_restart_keeps_the_code_the_instance_started_with(
    make_pool: MakePool, sources: Sources, tmp_path: Path
) -> None:
    mod = sources.module("crashing")
    log = tmp_path / "c.log"
    pool = make_pool([WorkerSpec(name="c", target=mod.target, num=1, env={"LOG": str(log)})])
    first = pid_of(pool, "c")

    sources.edit(mod, "v2")
    os.kill(first, signal.SIGKILL)  # a crash after readiness: restarted at once
    second = replaced(pool, "c", first)
    assert start_of(log, second).version == "v1", "a crash restart must not load new code"
    assert the_status(pool, "c").last_exit_status == -signal.SIGKILL

    pool.restart_workers()  # now the edit takes effect
    third = pid_of(pool, "c")
    assert third != second
    assert start_of(log, third).version == "v2", starts(log)

    sources.edit(mod, "v3")
    os.kill(third, signal.SIGKILL)  # and a crash now comes back on v2, not v1 nor v3
    fourth = replaced(pool, "c", third)
    assert start_of(log, fourth).version == "v2", starts(log)


@pytest.mark.parametrize("kind", ["import", "syntax", "exit"])
def test_module_that_fails_to_import_leaves_old_instances_serving(
    make_pool: MakePool, sources: Sources, tmp_path: Path, kind: Broken
) -> None:
    bad, good = sources.module("bad"), sources.module("good")
    bad_log, good_log = tmp_path / "bad.log", tmp_path / "good.log"
    pool = make_pool(
        [
            WorkerSpec(name="bad", target=bad.target, num=2, env={"LOG": str(bad_log)}),
            WorkerSpec(name="good", target=good.target, num=1, env={"LOG": str(good_log)}),
        ]
    )
    old = ready_pids(pool, "bad", 2)
    good_old = pid_of(pool, "good")

    sources.break_(bad, kind)
    sources.edit(good, "v2")
    with pytest.raises(bgpool.WorkerBootFailed) as info:
        pool.restart_workers()
    assert '"bad"' in str(info.value), str(info.value)
    assert '"good"' not in str(info.value), str(info.value)

    # the old instances were not drained: same pids, still ready, still on v1
    assert [int(s.pid) for s in sorted(statuses(pool, "bad"), key=lambda s: s.instance)] == old
    assert all(state(s.state) == "ready" for s in statuses(pool, "bad"))
    assert all(alive(p) for p in old)
    assert sorted(s.pid for s in starts(bad_log)) == sorted(old)  # nothing new was started
    pool.ensure("bad", timeout=2)
    diag = pool.diagnostics("bad")
    assert diag.last_error is not None, diag
    if kind == "import":
        assert diag.last_error.type == "ImportError", diag.last_error
        assert IMPORT_ERROR_TEXT in diag.last_error.message, diag.last_error
    elif kind == "exit":  # the generation died importing it, and loaded again without it
        assert diag.last_error.type == "ImportError", diag.last_error
        assert "ended its process (exit status 3)" in diag.last_error.message, diag.last_error
    else:
        assert diag.last_error.type == "SyntaxError", diag.last_error
        assert diag.last_error.message, diag.last_error
    # the worker whose code loads was replaced all the same
    good_new = pid_of(pool, "good")
    assert good_new != good_old
    assert start_of(good_log, good_new).version == "v2"

    sources.edit(bad, "v3")  # fixed: the next restart takes it
    pool.restart_workers(["bad"])
    new = ready_pids(pool, "bad", 2)
    assert not set(new) & set(old)
    assert [start_of(bad_log, p).version for p in new] == ["v3", "v3"]


# ------------------------------------------------------------------- what is restarted


def test_restart_of_named_workers_touches_only_them(
    make_pool: MakePool, sources: Sources, tmp_path: Path
) -> None:
    mod_a, mod_b = sources.module("a"), sources.module("b")
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    pool = make_pool(
        [
            WorkerSpec(name="a", target=mod_a.target, num=1, env={"LOG": str(log_a)}),
            WorkerSpec(name="b", target=mod_b.target, num=1, env={"LOG": str(log_b)}),
        ]
    )
    a0, b0 = pid_of(pool, "a"), pid_of(pool, "b")
    sources.edit(mod_a, "v2")
    sources.edit(mod_b, "v2")

    pool.restart_workers(["a"])

    a1 = pid_of(pool, "a")
    assert a1 != a0
    assert start_of(log_a, a1).version == "v2"
    assert pid_of(pool, "b") == b0
    assert alive(b0)
    assert [s.pid for s in starts(log_b)] == [b0]

    with bgpool.connect(pool.address) as client:  # a client restarts as the owner does
        client.restart_workers("b")  # a str names one worker
    b1 = pid_of(pool, "b")
    assert b1 != b0
    assert start_of(log_b, b1).version == "v2"
    assert pid_of(pool, "a") == a1


def test_restart_in_a_scope_touches_only_that_scope(
    make_pool: MakePool, sources: Sources, tmp_path: Path
) -> None:
    mod = sources.module("scoped")
    api = bgpool.next_scope("api")
    log = tmp_path / "svc.log"
    pool = make_pool(
        [
            WorkerSpec(name="svc", target=mod.target, num=1, env={"LOG": str(log), "V": "g"}),
            WorkerSpec(
                name="svc", target=mod.target, num=1, scope=api, env={"LOG": str(log), "V": "a"}
            ),
        ]
    )
    glob0, api0 = pid_of(pool, "svc"), pid_of(pool, "svc", scope="api")
    sources.edit(mod, "v2")

    pool.restart_workers(["svc"], scope=api)

    api1 = pid_of(pool, "svc", scope="api")
    assert api1 != api0
    assert start_of(log, api1) == Start(api1, "v2", "a", 0)
    assert pid_of(pool, "svc") == glob0


def test_restart_of_undeclared_name_raises(make_pool: MakePool, sources: Sources) -> None:
    mod = sources.module("one")
    pool = make_pool([WorkerSpec(name="a", target=mod.target, num=1)])
    a0 = pid_of(pool, "a")
    with pytest.raises(bgpool.WorkerNotDeclared) as info:
        pool.restart_workers(["nope"])
    assert 'no background worker configured for name "nope"' in str(info.value)
    assert pid_of(pool, "a") == a0


def test_restart_leaves_a_lazy_worker_never_ensured_unstarted(
    make_pool: MakePool, sources: Sources, tmp_path: Path
) -> None:
    mod = sources.module("lazy")
    eager_log, lazy_log = tmp_path / "eager.log", tmp_path / "lazy.log"
    pool = make_pool(
        [
            WorkerSpec(name="eager", target=mod.target, num=1, env={"LOG": str(eager_log)}),
            WorkerSpec(name="lazy", target=mod.target, env={"LOG": str(lazy_log)}),
        ]
    )
    e0 = pid_of(pool, "eager")
    sources.edit(mod, "v2")

    pool.restart_workers()
    assert pid_of(pool, "eager") != e0  # the restart did happen
    pool.restart_workers(["lazy"])

    lazy = the_status(pool, "lazy")
    assert state(lazy.state) == "stopped", lazy
    assert lazy.pid is None
    assert lazy.ever_ready is False
    assert starts(lazy_log) == []
    pool.ensure("lazy", timeout=5)  # and it still starts, on the new code
    assert start_of(lazy_log, pid_of(pool, "lazy")).version == "v2"


def test_pool_restart_is_rolling(make_pool: MakePool, sources: Sources, tmp_path: Path) -> None:
    """A pool of 4 keeps at least 3 ready instances through its restart."""
    mod = sources.module("rolling")
    log = tmp_path / "p.log"
    pool = make_pool(
        [
            WorkerSpec(
                name="p", target=mod.target, num=4, env={"LOG": str(log), "BOOT_DELAY": "0.15"}
            )
        ]
    )
    old = ready_pids(pool, "p", 4)
    sources.edit(mod, "v2")

    stop = threading.Event()
    samples: list[int] = []

    def sample() -> None:
        while not stop.is_set():
            found = statuses(pool, "p")
            samples.append(sum(1 for s in found if state(s.state) == "ready"))

    sampler = Background(sample)
    try:
        pool.restart_workers()
    finally:
        stop.set()
        sampler.wait(5, "the sampler")
    assert sampler.error is None, sampler.error
    assert samples, "no sample taken"
    assert min(samples) >= 3, f"ready count fell to {min(samples)} during the restart"
    assert 3 in samples, "the sampler never saw an instance being replaced"

    new = ready_pids(pool, "p", 4)
    assert not set(new) & set(old), (old, new)
    assert sorted(s.instance for s in starts(log) if s.pid in new) == [0, 1, 2, 3]
    assert all(start_of(log, p).version == "v2" for p in new)
    assert all(gone(p) for p in old)
    assert_children_of_supervisor(pool, new)


# ------------------------------------------------------------------------ file watch


def watching(
    make_pool: MakePool, name: str, target: str, log: Path, pattern: str, root: Path
) -> Any:
    """A pool of one worker `name` that watches `pattern` under `root`."""
    spec = WorkerSpec(name=name, target=target, num=1, env={"LOG": str(log)}, watch=[pattern])
    return make_pool([spec], root=root)


def test_watched_file_change_restarts_on_new_code(
    make_pool: MakePool, sources: Sources, tmp_path: Path
) -> None:
    mod = sources.module("watched")
    log = tmp_path / "w.log"
    pool = watching(make_pool, "w", mod.target, log, "mods/*.py", tmp_path)
    old = pid_of(pool, "w")

    sources.edit(mod, "v2")  # no restart_workers(): the watch does it

    new = replaced(pool, "w", old)
    assert start_of(log, new).version == "v2", starts(log)
    wait_for(lambda: gone(old), what="the old instance gone")


def test_rapid_saves_make_one_restart(
    make_pool: MakePool, sources: Sources, tmp_path: Path
) -> None:
    mod = sources.module("debounced")
    log = tmp_path / "d.log"
    pool = watching(make_pool, "d", mod.target, log, "mods/**/*.py", tmp_path)
    old = pid_of(pool, "d")
    assert len(starts(log)) == 1

    t0 = time.monotonic()
    for i in range(2, 7):
        sources.edit(mod, f"v{i}")
        if i < 6:
            time.sleep(0.02)  # pacing the saves (the stimulus), not waiting for anything
    assert time.monotonic() - t0 < 0.2, "the five saves took too long to test the debounce"

    new = replaced(pool, "d", old)
    assert start_of(log, new).version == "v6", starts(log)  # the last save's code
    stays(lambda: len(starts(log)) == 2, 2.0, f"more than one restart: {starts(log)}")
    assert pid_of(pool, "d") == new


def test_changes_outside_the_watch_patterns_restart_nothing(
    make_pool: MakePool, sources: Sources, tmp_path: Path
) -> None:
    mod = sources.module("unwatched")
    log = tmp_path / "u.log"
    deep = tmp_path / "conf" / "a" / "b"
    deep.mkdir(parents=True)
    watched = deep / "settings.json"
    watched.write_text("{}")
    (tmp_path / "other").mkdir()
    pool = watching(make_pool, "u", mod.target, log, "conf/**/*.json", tmp_path)
    old = pid_of(pool, "u")

    (deep / "settings.txt").write_text("not json")
    (tmp_path / "conf" / "a" / "settings.json.bak").write_text("{}")
    (tmp_path / "other" / "settings.json").write_text("{}")
    (tmp_path / "settings.json").write_text("{}")
    sources.edit(mod, "v2")  # the module itself is not watched

    stays(lambda: len(starts(log)) == 1, 2.0, f"a non-matching change restarted: {starts(log)}")
    assert pid_of(pool, "u") == old

    watched.write_text('{"changed": true}')  # two levels under conf/: matches conf/**/*.json
    new = replaced(pool, "u", old)
    assert start_of(log, new).version == "v2"  # a new generation: the module edit runs too
