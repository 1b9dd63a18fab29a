"""Batch ``ensure([...])``: one deadline shared by every name; every name validated,
resolved and capacity-checked before any is started; ready names cost no round
trip; the timeout error names each worker that was not ready and why; the same
from another process and from inside a worker.
"""

from __future__ import annotations

import math
import re
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    TENANT,
    failing,
    last_json_line,
    names_in_log,
    read_json,
    run_python,
    since,
    spec,
    state,
    statuses,
    supervisor_of,
    tenant_log,
    the_status,
    time_while_stopped,
    wait_for,
    worker_pids,
)

import bgpool
from bgpool import next_scope

T = 1.5  # the shared deadline of the "slow" batches
SLOW = 0.6 * T  # each slow worker takes well over a third of it
SCOPE_B = next_scope("b")


def never_called(name: str, timeout: str = "1") -> str:
    return f'background worker "{name}" did not call get_worker_handle() within {timeout}s'


# ----------------------------------------------------------- shared deadline


def test_three_slow_named_workers_are_ready_within_one_deadline(
    make_pool: Any, sentinel_dir: Path
) -> None:
    log = sentinel_dir / "log"
    env = {"LOG": str(log), "DELAY": str(SLOW)}
    pool = make_pool([spec(n, "tenant", env=env) for n in ("a", "b", "c")])
    t0 = time.monotonic()
    pool.ensure(["a", "b", "c"], timeout=T)  # one after another would need 3 * SLOW
    elapsed = since(t0)
    assert SLOW - 0.05 <= elapsed < T, elapsed
    assert sorted(names_in_log(log)) == ["a", "b", "c"]
    started = [ts for *_, ts in tenant_log(log)]
    assert max(started) - min(started) < 0.5, started  # all started by the one call
    assert all(state(the_status(pool, n).state) == "ready" for n in ("a", "b", "c"))


def test_three_slow_catch_all_names_are_ready_within_one_deadline(
    make_pool: Any, sentinel_dir: Path
) -> None:
    log = sentinel_dir / "log"
    pool = make_pool([spec(None, "tenant", env={"LOG": str(log), "DELAY": str(SLOW)})])
    names = ["t-1", "t-2", "t-3"]
    t0 = time.monotonic()
    pool.ensure(names, timeout=T)
    elapsed = since(t0)
    assert SLOW - 0.05 <= elapsed < T, elapsed
    assert sorted(names_in_log(log)) == names
    assert {s.name for s in pool.status() if state(s.state) == "ready"} == set(names)


def test_pool_named_and_catch_all_names_in_one_batch(make_pool: Any, sentinel_dir: Path) -> None:
    log = sentinel_dir / "log"
    env = {"LOG": str(log), "DELAY": str(SLOW)}
    pool = make_pool(
        [
            spec("lazy", "tenant", env=env),
            spec(None, "tenant", env=env),
            spec("p", "tenant", num=3, env={"LOG": str(log)}),
        ]
    )
    t0 = time.monotonic()
    pool.ensure(["p", "lazy", "tenant-1"], timeout=T)
    assert since(t0) < T
    assert state(the_status(pool, "lazy").state) == "ready"
    assert state(the_status(pool, "tenant-1").state) == "ready"
    assert any(state(s.state) == "ready" for s in statuses(pool, "p"))
    assert sorted((n, i) for _, n, _, i, _ in tenant_log(log) if n != "p") == [
        ("lazy", 0), ("tenant-1", 0),
    ]  # fmt: skip


def test_batch_with_never_ready_workers_fails_in_one_timeout(
    make_pool: Any, sentinel_dir: Path
) -> None:
    log = sentinel_dir / "log"
    pool = make_pool(
        [
            spec(None, "tenant", env={"LOG": str(log), "HANG_NAMES": "nr1,nr2,nr3"}),
            spec("ok", "tenant", env={"LOG": str(log)}),
        ],
        grace_period=0.2,
    )
    t0 = time.monotonic()
    with pytest.raises(bgpool.EnsureTimeout) as info:
        pool.ensure(["nr1", "ok", "nr2", "nr3"], timeout=1)
    elapsed = since(t0)
    assert 0.9 <= elapsed < 1.8, elapsed  # one deadline: not 3 s
    parts = str(info.value).split("; ")
    assert sorted(parts) == [never_called(n) for n in ("nr1", "nr2", "nr3")], str(info.value)
    assert isinstance(info.value, TimeoutError)
    assert info.value.diagnostics.name in {"nr1", "nr2", "nr3"}
    # everything was started by the one call; "ok" is ready
    assert sorted(names_in_log(log)) == ["nr1", "nr2", "nr3", "ok"]
    assert state(the_status(pool, "ok").state) == "ready"
    for n in ("nr1", "nr2", "nr3"):
        st = the_status(pool, n)
        assert st.pid is not None and st.ever_ready is False


def test_timeout_message_says_why_each_worker_was_not_ready(
    make_pool: Any, sentinel_dir: Path
) -> None:
    fail = failing(sentinel_dir, "bad")
    pool = make_pool(
        [
            spec(None, "tenant", max_consecutive_failures=-1,
                 env={"FAIL_DIR": str(fail), "HANG_NAMES": "hung"}),
        ],
        grace_period=0.2,
    )  # fmt: skip
    t0 = time.monotonic()
    with pytest.raises(bgpool.EnsureTimeout) as info:
        pool.ensure(["fine", "hung", "bad"], timeout=1)
    assert 0.9 <= since(t0) < 1.8
    hung = re.escape(never_called("hung"))
    bad = (
        r'background worker "bad" did not become ready within 1s; last attempt \d+ failed '
        rf"\(exit status 1, target {re.escape(TENANT)}\): RuntimeError: boom bad "
        r"\(.+workers\.py, line \d+\)"
    )
    message = str(info.value)
    assert re.fullmatch(rf"(?:{hung}; {bad}|{bad}; {hung})", message), message
    assert '"fine"' not in message
    assert info.value.diagnostics.name in {"hung", "bad"}


def test_batch_with_an_aborting_member_fails_before_the_deadline(
    make_pool: Any, sentinel_dir: Path
) -> None:
    fail = failing(sentinel_dir, "bad")
    pool = make_pool(
        [spec(None, "tenant", max_consecutive_failures=2, env={"FAIL_DIR": str(fail)})]
    )
    t0 = time.monotonic()
    with pytest.raises(bgpool.WorkerAborted) as info:
        pool.ensure(["fine", "bad"], timeout=20)
    assert since(t0) < 5.0
    assert str(info.value).startswith(
        'background worker "bad" failed to start: 2 consecutive failures '
        f"(last exit status 1, target {TENANT}): RuntimeError: boom bad"
    ), str(info.value)
    assert info.value.diagnostics.name == "bad"


def test_ready_names_in_a_batch_cost_no_round_trip(
    make_pool: Any, sigcont_on_exit: list[int]
) -> None:
    pool = make_pool([spec("p", "tenant", num=2), spec("lazy", "tenant"), spec(None, "tenant")])
    pool.ensure(["lazy", "tenant-1", "tenant-2"], timeout=5)
    sup = supervisor_of(the_status(pool, "lazy").pid)
    took = time_while_stopped(
        lambda: pool.ensure(["p", "tenant-2", "lazy", "tenant-1"], timeout=2),
        sup.pid,
        sigcont_on_exit,
    )
    assert took < 0.5, took


# ------------------------------------------------------ nothing started


@pytest.fixture
def mixed_pool(make_pool: Any, sentinel_dir: Path) -> Any:
    """A lazy named ``lazy`` and a global catch-all (cap 3), both logging to ``log``;
    scope ``b`` holds a lazy named ``x`` only."""
    env = {"LOG": str(sentinel_dir / "log")}
    pool = make_pool(
        [
            spec("lazy", "tenant", env=env),
            spec(None, "tenant", max_instances=3, env=env),
            spec("x", "tenant", env=env, scope=SCOPE_B),
        ]
    )
    return pool


def assert_nothing_started(pool: Any, sentinel_dir: Path) -> None:
    assert tenant_log(sentinel_dir / "log") == []
    assert sorted((s.name, s.scope) for s in pool.status()) == [("lazy", ""), ("x", "b")]
    assert all(s.pid is None and s.attempts == 0 for s in pool.status())
    assert worker_pids() == set()


BAD_BATCHES = [
    pytest.param(["lazy", "t1", 7], {}, TypeError, id="int-element"),
    pytest.param(["t1", None], {}, TypeError, id="None-element"),
    pytest.param(["lazy", "t1"], {"timeout": "1"}, TypeError, id="str-timeout"),
    pytest.param(["t1", "t2"], {"timeout": True}, TypeError, id="bool-timeout"),
    pytest.param(["lazy", "t1", ""], {}, ValueError, id="empty-element"),
    pytest.param(["t1", "t2", "t1"], {}, ValueError, id="duplicate-catch-all-name"),
    pytest.param(["t1", "t\x002"], {}, ValueError, id="nul-element"),
    pytest.param(["lazy", "t1"], {"timeout": 0}, ValueError, id="zero-timeout"),
    pytest.param(["lazy", "t1"], {"timeout": math.nan}, ValueError, id="nan-timeout"),
    pytest.param(["t1", "t2", "t3", "t4"], {"timeout": -1}, ValueError, id="over-cap-and-bad"),
    pytest.param(["t1", "t2", "t3", "t4"], {}, bgpool.CatchAllLimitReached, id="over-cap"),
    # in the global scope "x" (declared in scope b only) is one more catch-all name
    pytest.param(["t1", "t2", "lazy", "x", "t3"], {}, bgpool.CatchAllLimitReached, id="x-counts"),
]


@pytest.mark.parametrize(("names", "kwargs", "error"), BAD_BATCHES)
def test_bad_batch_starts_nothing(
    mixed_pool: Any,
    sentinel_dir: Path,
    names: list[Any],
    kwargs: dict[str, Any],
    error: type[BaseException],
) -> None:
    with pytest.raises(error):
        mixed_pool.ensure(names, **kwargs)
    assert_nothing_started(mixed_pool, sentinel_dir)


def test_undeclared_name_in_a_scoped_batch_starts_nothing(
    mixed_pool: Any, sentinel_dir: Path
) -> None:
    # scope b declares only "x": no catch-all there, no fallback per name
    with pytest.raises(bgpool.WorkerNotDeclared) as info:
        mixed_pool.ensure(["x", "t1"], scope=SCOPE_B, timeout=5)
    assert str(info.value) == 'no background worker configured for name "t1"'
    with pytest.raises(bgpool.WorkerNotDeclared):
        mixed_pool.ensure(["x", "lazy"], scope="b", timeout=5)
    assert_nothing_started(mixed_pool, sentinel_dir)
    # and the good batches of each scope work
    mixed_pool.ensure(["x"], scope="b", timeout=5)
    mixed_pool.ensure(["lazy", "t1", "x"], timeout=5)  # "x" is a catch-all name here
    assert sorted((n, sc) for _, n, sc, _, _ in tenant_log(sentinel_dir / "log")) == [
        ("lazy", ""), ("t1", ""), ("x", ""), ("x", "b"),
    ]  # fmt: skip
    assert len(statuses(mixed_pool, "x")) == 2


# ------------------------------------------ another process, inside a worker


def test_batch_from_another_process_shares_one_deadline(make_pool: Any, sentinel_dir: Path) -> None:
    log = sentinel_dir / "log"
    env = {"LOG": str(log), "DELAY": str(SLOW)}
    make_pool(
        [
            spec("a", "tenant", env=env),
            spec(None, "tenant", env={**env, "HANG_NAMES": "nr"}),
        ],
        grace_period=0.2,
    )
    code = textwrap.dedent(
        f"""
        import json, time, bgpool
        client = bgpool.connect()
        out = {{}}
        t0 = time.monotonic()
        client.ensure(["a", "t-1", "t-2"], timeout={T})
        out["ok_elapsed"] = time.monotonic() - t0
        t0 = time.monotonic()
        try:
            client.ensure(["t-3", "nr", "t-4"], timeout=1)
        except bgpool.EnsureTimeout as exc:
            out["timeout"] = str(exc)
        out["timeout_elapsed"] = time.monotonic() - t0
        try:
            client.ensure(["t-5", 5])
        except TypeError:
            out["type_error"] = True
        print(json.dumps(out))
        """
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    out = last_json_line(proc.stdout)
    assert out["ok_elapsed"] < T, out
    assert out["timeout"] == never_called("nr"), out
    assert 0.9 <= out["timeout_elapsed"] < 1.8, out
    assert out["type_error"] is True
    assert sorted(names_in_log(log)) == ["a", "nr", "t-1", "t-2", "t-3", "t-4"]


def test_batch_from_inside_a_worker_shares_one_deadline(make_pool: Any, sentinel_dir: Path) -> None:
    log, result = sentinel_dir / "log", sentinel_dir / "result.json"
    env = {"LOG": str(log), "DELAY": str(SLOW)}
    pool = make_pool(
        [
            spec("a", "tenant", env=env),
            spec(None, "tenant", env=env),
            spec(
                "driver",
                "ensurer",
                env={
                    "ENSURE": "a,t-1,t-2",
                    "BATCH": "1",
                    "TIMEOUT": str(T),
                    "RESULT": str(result),
                },
            ),
        ]
    )
    pool.ensure("driver", timeout=5)
    data = wait_for(lambda: read_json(result), timeout=15, what="the driver's result")
    (outcome,) = data["outcomes"]["batch"]
    assert outcome["ok"] is True, outcome
    assert outcome["elapsed"] < T, outcome
    assert sorted(names_in_log(log)) == ["a", "t-1", "t-2"]
    rows = {s["name"]: s["state"] for s in data["status"]}
    assert rows == {"driver": "ready", "a": "ready", "t-1": "ready", "t-2": "ready"}
