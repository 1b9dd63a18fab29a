"""Requirements between workers: `WorkerSpec.requires` (README, "Dependencies
between workers").

A worker starts only once what it requires is ready (at start(), on ensure(),
after a reload); shutdown drains dependants before what they require; cycles
and unknown names are declaration errors. Order is observed through the
events the fixture workers append to one file (`fixtures/requires_workers.py`):
a dependant's ``start`` must follow its requirement's ``ready`` (written just
before the handle is taken, after a boot delay), and a requirement's ``stop``
must follow its dependant's ``exit``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import Background, read_text, spec, wait_for
from pydantic import ValidationError

import bgpool
from bgpool import PoolConfig, WorkerSpec

MakePool = Callable[..., Any]
ORDERED = "fixtures.requires_workers:ordered"


def worker(
    name: str, order: Path, *requires: str, target: str = ORDERED, **kwargs: Any
) -> WorkerSpec:
    env = {"ORDER": str(order), "BOOT_DELAY": "0.2", **kwargs.pop("env", {})}
    return WorkerSpec(name=name, target=target, requires=list(requires), env=env, **kwargs)


def events(order: Path) -> list[str]:
    return (read_text(order) or "").splitlines()


def assert_before(order: Path, first: str, then: str) -> None:
    seen = events(order)
    assert first in seen, f"no {first!r} in {seen}"
    assert then not in seen or seen.index(first) < seen.index(then), (
        f"{then!r} before {first!r}: {seen}"
    )


def assert_requirement_first(order: Path, dependant: str, requirement: str) -> None:
    """`dependant` started only once `requirement` was about to be ready."""
    assert f"start {dependant}" in events(order)
    assert_before(order, f"ready {requirement}", f"start {dependant}")


# ------------------------------------------------------------------ declarations


def error_of(*workers: WorkerSpec | dict[str, Any]) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        PoolConfig(workers=list(workers))  # type: ignore[arg-type]  # dicts are validated too
    return info.value


IDLE = "fixtures.workers:idle"


def test_a_cycle_is_refused_naming_it_in_order() -> None:
    exc = error_of(
        WorkerSpec(name="a", target=IDLE, requires=["b"]),
        WorkerSpec(name="b", target=IDLE, requires=["c"]),
        WorkerSpec(name="c", target=IDLE, requires=["a"]),
        WorkerSpec(name="d", target=IDLE, requires=["a"]),  # leads to the cycle, not on it
    )
    errors = exc.errors()
    assert len(errors) == 1
    assert errors[0]["loc"] == ("workers", 0, "requires")
    assert "a -> b -> c -> a" in errors[0]["msg"]


def test_a_cycle_is_named_from_its_first_declaration_and_each_cycle_once() -> None:
    exc = error_of(
        WorkerSpec(name="x", target=IDLE, requires=["z"]),
        WorkerSpec(name="y", target=IDLE, requires=["x"]),
        WorkerSpec(name="z", target=IDLE, requires=["y"]),
        WorkerSpec(name="p", target=IDLE, requires=["q"]),
        WorkerSpec(name="q", target=IDLE, requires=["p"]),
    )
    found = {e["loc"]: e["msg"] for e in exc.errors()}
    assert set(found) == {("workers", 0, "requires"), ("workers", 3, "requires")}
    assert "x -> z -> y -> x" in found[("workers", 0, "requires")]
    assert "p -> q -> p" in found[("workers", 3, "requires")]


def test_an_unknown_or_catch_all_served_name_is_refused_with_its_path() -> None:
    exc = error_of(
        WorkerSpec(name="mailer", target=IDLE),
        WorkerSpec(name="api", target=IDLE, requires=["mailr"]),
        WorkerSpec(target=IDLE, requires=["tenant"]),  # a catch-all's names are no requirement
    )
    found = {e["loc"]: e["msg"] for e in exc.errors()}
    assert set(found) == {("workers", 1, "requires"), ("workers", 2, "requires")}
    assert '"mailr"' in found[("workers", 1, "requires")]
    assert 'did you mean "mailer"?' in found[("workers", 1, "requires")]
    assert '"tenant"' in found[("workers", 2, "requires")]


def test_a_requirement_in_another_scope_is_unknown() -> None:
    other = bgpool.next_scope("other")
    exc = error_of(
        WorkerSpec(name="db", target=IDLE, scope=other),
        WorkerSpec(name="api", target=IDLE, requires=["db"]),
    )
    assert [e["loc"] for e in exc.errors()] == [("workers", 1, "requires")]


def test_duplicates_and_itself_are_refused_with_the_field_path() -> None:
    exc = error_of(
        {"name": "db", "target": IDLE},
        {"name": "api", "target": IDLE, "requires": ["db", "db"]},
        {"name": "self", "target": IDLE, "requires": ["self"]},
        {"name": "bad", "target": IDLE, "requires": [""]},
    )
    found = {e["loc"][:3]: e["msg"] for e in exc.errors()}
    assert set(found) == {("workers", 1, "requires"), ("workers", 2, "requires"),
                          ("workers", 3, "requires")}  # fmt: skip
    assert '"db"' in found[("workers", 1, "requires")]
    assert "itself" in found[("workers", 2, "requires")]


def test_a_requirement_of_an_invalid_declaration_is_not_called_unknown() -> None:
    exc = error_of(
        {"name": "db", "target": IDLE, "num": -1},
        {"name": "api", "target": IDLE, "requires": ["db"]},
    )
    assert [e["loc"] for e in exc.errors()] == [("workers", 0, "num")]


def test_a_valid_graph_is_accepted_and_sent_to_the_supervisor() -> None:
    config = PoolConfig(workers=[
        WorkerSpec(name="db", target=IDLE),
        WorkerSpec(name="api", target=IDLE, requires=["db"]),
        WorkerSpec(target=IDLE, requires=["db", "api"]),
    ])  # fmt: skip
    assert [m["requires"] for m in config.worker_messages()] == [[], ["db"], ["db", "api"]]


# ------------------------------------------------------------------ start order


def test_start_follows_a_chain(make_pool: MakePool, tmp_path: Path) -> None:
    order = tmp_path / "order"
    # declared dependants first, so declaration order cannot pass for dependency order
    make_pool([
        worker("app", order, "cache", num=1),
        worker("cache", order, "db", num=1),
        worker("db", order, num=1),
    ])  # fmt: skip
    assert_requirement_first(order, "cache", "db")
    assert_requirement_first(order, "app", "cache")


def test_start_follows_a_diamond_in_layers(make_pool: MakePool, tmp_path: Path) -> None:
    order = tmp_path / "order"
    pool = make_pool([
        worker("top", order, "left", "right", num=1),
        worker("left", order, "bottom", num=1),
        worker("right", order, "bottom"),  # lazy: started because "top" needs it
        worker("bottom", order, num=1),
    ])  # fmt: skip
    for dependant, requirement in [("left", "bottom"), ("right", "bottom"),
                                   ("top", "left"), ("top", "right")]:  # fmt: skip
        assert_requirement_first(order, dependant, requirement)
    assert events(order).count("start bottom") == 1
    assert {s.name: s.state for s in pool.status()}["right"] == "ready"


def test_a_requirement_that_cannot_start_fails_start_naming_it(
    make_pool: MakePool, tmp_path: Path
) -> None:
    order = tmp_path / "order"
    pool = make_pool([
        worker("app", order, "db", num=1),
        spec("db", "crash_at_boot", max_consecutive_failures=2),
    ], start=False)  # fmt: skip
    with pytest.raises(bgpool.StartupError) as info:
        pool.start()
    message = str(info.value)
    assert 'background worker "db" failed to start: 2 consecutive failures' in message
    assert "RuntimeError: boom" in message
    assert 'background worker "app" was not started, as it requires "db"' in message
    assert [d.name for d in info.value.diagnostics] == ["db", "app"]
    assert "start app" not in events(order)


# ------------------------------------------------------------------ ensure()


def test_ensure_of_a_lazy_dependant_starts_its_lazy_requirement_first(
    make_pool: MakePool, tmp_path: Path
) -> None:
    order = tmp_path / "order"
    pool = make_pool([worker("api", order, "db"), worker("db", order)])
    assert events(order) == []
    pool.ensure("api")
    assert_requirement_first(order, "api", "db")
    assert {s.name: s.state for s in pool.status()} == {"api": "ready", "db": "ready"}


def test_a_dependant_waiting_shows_what_it_waits_for(make_pool: MakePool, tmp_path: Path) -> None:
    order = tmp_path / "order"
    pool = make_pool([worker("api", order, "db"), worker("db", order, env={"BOOT_DELAY": "1.5"})])
    pool.start_workers("api")
    wait_for(lambda: "start db" in events(order), what="db to start")
    diagnostics = pool.diagnostics("api")
    assert diagnostics.waiting_for == ["db"]
    assert diagnostics.state == "stopped"
    pool.ensure("api")
    assert pool.diagnostics("api").waiting_for == []


def test_ensure_of_a_dependant_whose_requirement_aborts_names_it(
    make_pool: MakePool, tmp_path: Path
) -> None:
    order = tmp_path / "order"
    pool = make_pool(
        [worker("api", order, "db"), spec("db", "crash_at_boot", max_consecutive_failures=2)]
    )
    with pytest.raises(bgpool.WorkerAborted) as info:
        pool.ensure("api")
    message = str(info.value)
    assert message.startswith('background worker "api" was not started, as it requires "db": ')
    assert 'background worker "db" failed to start: 2 consecutive failures' in message
    assert info.value.diagnostics is not None and info.value.diagnostics.name == "db"
    assert "start api" not in events(order)


def test_fail_fast_applies_to_a_requirement(make_pool: MakePool, tmp_path: Path) -> None:
    order = tmp_path / "order"
    pool = make_pool(
        [worker("api", order, "db"), spec("db", "crash_at_boot", max_consecutive_failures=-1)]
    )
    with pytest.raises(bgpool.WorkerBootFailed) as info:
        pool.ensure("api", fail_fast=True, timeout=5.0)
    assert not isinstance(info.value, bgpool.WorkerAborted)
    message = str(info.value)
    assert 'as it requires "db": background worker "db" failed to boot: attempt 1' in message


def test_ensure_timeout_names_the_requirement_not_ready(
    make_pool: MakePool, tmp_path: Path
) -> None:
    order = tmp_path / "order"
    pool = make_pool([
        worker("app", order, "cache"),
        worker("cache", order, "db"),
        spec("db", "never_ready"),
    ])  # fmt: skip
    t0 = time.monotonic()
    with pytest.raises(bgpool.EnsureTimeout) as info:
        pool.ensure("app", timeout=0.5)
    assert time.monotonic() - t0 < 3.0  # one deadline for the whole chain
    assert str(info.value) == (
        'background worker "app" was not started, as it requires "db" (app -> cache -> db): '
        'background worker "db" did not call get_worker_handle() within 0.5s'
    )
    assert events(order) == []  # neither cache nor app started


def test_a_catch_all_name_waits_for_its_requirements(make_pool: MakePool, tmp_path: Path) -> None:
    order = tmp_path / "order"
    pool = make_pool([worker(None, order, "db"), worker("db", order)])  # type: ignore[arg-type]
    pool.ensure("tenant-1")
    assert_requirement_first(order, "tenant-1", "db")


def test_stop_of_a_requirement_answers_a_dependant_waiting_to_start(
    make_pool: MakePool, tmp_path: Path
) -> None:
    order = tmp_path / "order"
    pool = make_pool([worker("api", order, "db"), worker("db", order, env={"BOOT_DELAY": "1.5"})])
    call = Background(lambda: pool.ensure("api"))
    wait_for(lambda: "start db" in events(order), what="db to start")
    pool.stop("db")
    call.wait(3.0, "ensure('api')")
    assert isinstance(call.error, bgpool.BgpoolError)
    assert 'as it requires "db", which was stopped' in str(call.error)
    assert "start api" not in events(order)
    pool.ensure("api")  # starts both again
    assert_requirement_first(order, "api", "db")


# ------------------------------------------------------------------ reload


def new_config(workers: list[WorkerSpec], start_method: str | None) -> PoolConfig:
    """A config to reload: make_pool's settings, with `workers`."""
    method: dict[str, Any] = {"start_method": start_method} if start_method is not None else {}
    return PoolConfig(workers=workers, grace_period=5.0, ensure_timeout=10.0, **method)


def test_reload_adding_a_dependant_and_its_requirement_keeps_the_order(
    make_pool: MakePool, tmp_path: Path, start_method: str | None
) -> None:
    order = tmp_path / "order"
    first = [worker("web", order, num=1)]
    pool = make_pool(first)
    report = pool.reload(new_config([
        *first,
        worker("search", order, "index", num=1),
        worker("index", order),  # lazy: started because "search" needs it
    ], start_method))  # fmt: skip
    assert sorted(report.added) == ["index", "search"]
    assert_requirement_first(order, "search", "index")
    assert {s.name: s.state for s in pool.status()}["search"] == "ready"


def test_reload_adding_a_dependant_of_a_declared_lazy_requirement(
    make_pool: MakePool, tmp_path: Path, start_method: str | None
) -> None:
    order = tmp_path / "order"
    first = [worker("web", order, num=1), worker("db", order)]
    pool = make_pool(first)
    report = pool.reload(new_config([*first, worker("api", order, "db", num=1)], start_method))
    assert report.added == ["api"]
    assert report.unchanged == ["web", "db"]
    assert_requirement_first(order, "api", "db")
    assert events(order).count("start web") == 1


# ------------------------------------------------------------------ shutdown


def test_shutdown_drains_dependants_before_what_they_require(
    make_pool: MakePool, tmp_path: Path
) -> None:
    order = tmp_path / "order"
    lingering = {"STOP_DELAY": "0.3", "BOOT_DELAY": "0"}
    pool = make_pool([
        worker("db", order, num=1, env=lingering),
        worker("cache", order, "db", num=1, env=lingering),
        worker("app", order, "cache", num=1, env=lingering),
    ])  # fmt: skip
    pool.shutdown()
    assert_before(order, "exit app", "stop cache")
    assert_before(order, "exit cache", "stop db")
    assert "stop db" in events(order)


def test_a_dependant_that_ignores_the_drain_holds_its_requirement_only_for_the_grace_period(
    make_pool: MakePool, tmp_path: Path
) -> None:
    order = tmp_path / "order"
    pool = make_pool([
        worker("db", order, num=1, env={"STOP_DELAY": "30"}),  # only SIGTERM ends it
        worker("app", order, "db", num=1, target="fixtures.requires_workers:deaf"),
    ], grace_period=1.0)  # fmt: skip
    t0 = time.monotonic()
    pool.shutdown()
    took = time.monotonic() - t0
    # One deadline for the pool: SIGTERM to both at 1 s (db's stop pipe closed then),
    # not app's grace period followed by one of db's (SIGTERM to db at 2 s).
    assert took < 1.0 + 0.7, f"shutdown took {took:.2f}s"
