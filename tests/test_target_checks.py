"""Declaration checks of a running pool (README, "Declaring workers"): a
``"module:function"`` target whose function does not exist is refused once,
when its code is loaded, by ``start()``, by an ``ensure()`` that would start
it and by ``reload()``, with the closest name the module has; never a series
of boot failures. ``WorkerNotDeclared`` names the closest declared names.

That no worker process was made is checked where the pool still answers by
its diagnostics (``attempts``), and everywhere by the start log every
generated worker appends to as its first step (``fixtures/reload_fixtures.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest
from helpers import BgpoolRun, spec

import bgpool
from bgpool import PoolConfig, WorkerSpec
from fixtures.reload_fixtures import Sources, starts, write_source

MakePool = Callable[..., Any]
StartMethod = Literal["fork", "spawn"]


@pytest.fixture(params=["fork", "spawn"])
def method(request: pytest.FixtureRequest) -> StartMethod:
    """Both start methods: with spawn, a process forked only to import the
    targets does the check."""
    value: StartMethod = request.param
    return value


def renamed(worker: Any, old: str, new: str) -> None:
    """Edit a generated worker module: its function `old` is now `new`."""
    text = worker.path.read_text().replace(f"def {old}(", f"def {new}(")
    write_source(worker.path, text)


def test_start_refuses_a_misspelt_function_before_any_worker_runs(
    make_pool: MakePool, sources: Sources, tmp_path: Path, method: StartMethod
) -> None:
    mod = sources.module("typo")
    log = tmp_path / "starts.log"
    module = mod.target.partition(":")[0]
    pool = make_pool(
        [
            WorkerSpec(name="fine", target=mod.target, num=1, env={"LOG": str(log)}),
            WorkerSpec(name="job", target=f"{module}:rnu", num=1, max_consecutive_failures=6),
        ],
        start=False,
        start_method=method,
    )
    with pytest.raises(bgpool.StartupError) as info:
        pool.start()
    assert str(info.value) == (
        f'could not start the pool: background worker "job" cannot run: target {module}:rnu '
        f'does not exist: module {module} has no attribute "rnu" (did you mean "run"?)'
    )
    (diag,) = info.value.diagnostics
    assert diag.name == "job" and diag.attempts == 0, diag
    assert diag.last_error is not None and diag.last_error.type == "AttributeError", diag
    assert diag.last_error.filename == str(mod.path), diag.last_error
    assert starts(log) == [], "a worker was started although the pool could not start"


def test_start_checks_lazy_declarations_and_catch_alls_too(
    make_pool: MakePool, method: StartMethod
) -> None:
    pool = make_pool(
        [
            spec("eager", "idle", num=1),
            spec("lazy", "idel"),
            WorkerSpec(target="fixtures.workers:reprot"),
        ],
        start=False,
        start_method=method,
    )
    with pytest.raises(bgpool.StartupError) as info:
        pool.start()
    text = str(info.value)
    assert 'background worker "lazy" cannot run' in text and '(did you mean "idle"?)' in text
    assert 'background worker "*" cannot run' in text and '(did you mean "report"?)' in text
    assert [d.name for d in info.value.diagnostics] == ["lazy"], info.value.diagnostics
    assert info.value.diagnostics[0].attempts == 0


def test_a_target_that_is_not_callable_is_refused_at_start(
    make_pool: MakePool, sources: Sources
) -> None:
    mod = sources.module("constant")
    module = mod.target.partition(":")[0]
    pool = make_pool([WorkerSpec(name="c", target=f"{module}:VERSION", num=1)], start=False)
    with pytest.raises(bgpool.StartupError) as info:
        pool.start()
    assert f"target {module}:VERSION is not callable (a str object)" in str(info.value)
    assert info.value.diagnostics[0].attempts == 0


def test_ensure_refuses_a_lazy_worker_whose_function_is_gone_from_the_new_code(
    make_pool: MakePool, sources: Sources, tmp_path: Path, method: StartMethod
) -> None:
    """Edited after start() (a restart loads the new code): ensure() of the
    lazy worker is refused at once, nothing is spawned, and once the
    function is back the same call starts it."""
    mod = sources.module("lazy")
    log = tmp_path / "starts.log"
    lazy = WorkerSpec(name="lazy", target=mod.target, env={"LOG": str(log)})
    pool = make_pool([spec("other", "idle", num=1), lazy], start_method=method)
    renamed(mod, "run", "runs")
    pool.restart_workers()  # the newest code now lacks run()
    module = mod.target.partition(":")[0]
    for fail_fast in (False, True):
        with pytest.raises(bgpool.WorkerBootFailed) as info:
            pool.ensure("lazy", timeout=10, fail_fast=fail_fast)
        assert str(info.value) == (
            f'background worker "lazy" cannot run: target {mod.target} does not exist: '
            f'module {module} has no attribute "run" (did you mean "runs"?)'
        )
        assert not isinstance(info.value, bgpool.WorkerAborted)
        assert info.value.diagnostics is not None and info.value.diagnostics.attempts == 0
    with pytest.raises(bgpool.WorkerBootFailed):  # a batch with it starts nothing
        pool.ensure(["other", "lazy"], timeout=10)
    diag = pool.diagnostics("lazy")
    assert diag.attempts == 0 and diag.state == "stopped", diag
    assert diag.last_error is not None and "did you mean" in diag.last_error.message
    assert starts(log) == []
    renamed(mod, "runs", "run")
    pool.restart_workers()
    pool.ensure("lazy", timeout=10)
    assert len(starts(log)) == 1


def test_reload_refuses_a_changed_or_added_worker_whose_function_is_missing(
    make_pool: MakePool, method: StartMethod
) -> None:
    pool = make_pool([spec("a", "idle", num=1)], start_method=method)
    pid = pool.diagnostics("a").instances[0].pid
    with pytest.raises(bgpool.WorkerBootFailed) as info:
        pool.reload(
            PoolConfig(
                start_method=method,
                workers=[spec("a", "idel", num=1), spec("b", "idle"), spec("c", "idlee")],
            )
        )
    assert str(info.value) == (  # the added one first, then the changed one
        'reload refused, nothing was changed: background worker "c" cannot run: target '
        "fixtures.workers:idlee does not exist: module fixtures.workers has no attribute "
        '"idlee" (did you mean "idle"?); reload refused, nothing was changed: background '
        'worker "a" cannot run: target fixtures.workers:idel does not exist: module '
        'fixtures.workers has no attribute "idel" (did you mean "idle"?)'
    )
    diag = pool.diagnostics("a")
    assert diag.instances[0].pid == pid and diag.attempts == 1, diag  # left running, untouched
    with pytest.raises(bgpool.WorkerNotDeclared):
        pool.ensure("b")  # nothing of the reload was applied


# -------------------------------------------------------------- WorkerNotDeclared


def test_worker_not_declared_names_the_closest_declared_names(make_pool: MakePool) -> None:
    api = bgpool.next_scope("api")
    pool = make_pool(
        [
            spec("mailer", "idle"),
            spec("mail-sender", "idle"),
            spec("importer", "idle"),
            spec("mailbox", "idle", scope=api),
        ]
    )
    with pytest.raises(bgpool.WorkerNotDeclared) as info:
        pool.ensure("mailr")
    assert str(info.value) == (
        'no background worker configured for name "mailr" (did you mean "mailer" or "mail-sender"?)'
    )
    with pytest.raises(bgpool.WorkerNotDeclared) as info:
        pool.diagnostics("IMPORTER2")  # case ignored
    assert str(info.value).endswith('(did you mean "importer"?)'), info.value
    with pytest.raises(bgpool.WorkerNotDeclared) as info:
        pool.ensure("mailbox")  # declared in another scope only: not offered
    assert str(info.value).endswith('(did you mean "mailer"?)'), info.value
    with pytest.raises(bgpool.WorkerNotDeclared) as info:
        pool.ensure("mailbx", scope=api)  # the scope's own names
    assert str(info.value).endswith('(did you mean "mailbox"?)'), info.value
    with pytest.raises(bgpool.WorkerNotDeclared) as info:
        pool.get_vars("zzz")
    assert str(info.value) == 'no background worker configured for name "zzz"'
    with pytest.raises(bgpool.WorkerNotDeclared) as info:
        pool.restart_workers(["importr"])
    assert str(info.value).endswith('(did you mean "importer"?)'), info.value


def test_bgpool_run_says_it_once_and_exits_1(tmp_path: Path, sentinel_dir: Path) -> None:
    config = tmp_path / "typo_config.py"
    config.write_text(
        "from bgpool import PoolConfig, WorkerSpec\n"
        "config = PoolConfig(workers=[WorkerSpec(name='job', target='fixtures.workers:idel', "
        "num=1)])\n"
    )
    run = BgpoolRun(str(config), sentinel_dir, "--plain")
    try:
        assert run.wait(30) == 1
    finally:
        run.close()
    output = run.text() + run.stderr()
    sentence = (
        'background worker "job" cannot run: target fixtures.workers:idel does not exist: '
        'module fixtures.workers has no attribute "idel" (did you mean "idle"?)'
    )
    assert f"StartupError: could not start the pool: {sentence}" in output, output
    assert output.count(sentence) == 1, output  # said once, not once per boot attempt
    assert "Traceback (most recent call last)" not in output, output
    assert "attempts:     0," in output, output  # its diagnostics: no worker was started


# ------------------------------------------------------------------ the wording


def test_closest_names_ignore_case_and_come_best_first() -> None:
    from bgpool import texts

    assert texts.closest("rnu", ["run", "runner", "stop"]) == ["run"]
    found = texts.closest("MAILER", ["mail", "mailer", "mailers"], 3)
    assert found == ["mailer", "mailers", "mail"]
    assert texts.closest("zzz", ["run"]) == []
    assert texts.not_declared("x", []) == 'no background worker configured for name "x"'
    assert texts.not_declared("ab", ["abc", "abd", "xab"]) == (
        'no background worker configured for name "ab" (did you mean "abc", "abd" or "xab"?)'
    )
