"""The asyncio API: `aensure()`, `astatus()`, `adiagnostics()` on a Pool and on a
connect() client, on real event loops; and `async def` worker targets, with
`handle.wait_async()`.

The async forms must be the blocking ones without the blocking: each error case
is run both ways and must raise the same type with the same message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import test_ensure_validation as validation
from helpers import (
    FIXTURES,
    published,
    read_json,
    source_line,
    spec,
    starts,
    supervisor_pid,
    the_status,
    thread_count,
    unix_socket_inodes,
    wait_for,
)

import bgpool
from bgpool import WorkerSpec
from bgpool.supervisor import logs as supervisor_logs
from fixtures import async_workers

lazy_pool = validation.lazy_pool  # the pool of test_ensure_validation: "lazy", "other"


def outcome(call: Callable[[], object]) -> tuple[type[BaseException], str]:
    """The type and message of what `call()` raises (it must raise)."""
    try:
        call()
    except Exception as exc:
        return type(exc), str(exc)
    raise AssertionError("the call did not raise")


def run(awaitable: Awaitable[Any]) -> Any:
    """Run `awaitable` on a fresh event loop."""

    async def main() -> Any:
        return await awaitable

    return asyncio.run(main())


def twins(sync: Callable[[], object], coro: Callable[[], Awaitable[Any]]) -> tuple[type, str]:
    """Check that `sync()` and `coro()` awaited raise the same; return it."""
    expected = outcome(sync)
    assert outcome(lambda: run(coro())) == expected
    return expected


# -- a cold start does not block the loop; a ready worker awaits nothing -----------


def test_the_loop_keeps_ticking_while_aensure_waits_for_a_boot(
    make_pool: Any, sentinel_dir: Path
) -> None:
    starts_file = sentinel_dir / "slow.starts"
    pool = make_pool([spec("slow", "slow_ready", env={"DELAY": "0.3", "STARTS": str(starts_file)})])
    client = bgpool.connect(pool.address)
    threads_before = thread_count()

    async def main() -> tuple[float, list[float], int]:
        ticks: list[float] = []
        most_threads = 0

        async def ticker() -> None:
            nonlocal most_threads
            while True:
                ticks.append(time.monotonic())
                most_threads = max(most_threads, thread_count())
                await asyncio.sleep(0.01)

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        await client.aensure("slow")
        took = time.monotonic() - t0
        ticking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticking
        return took, ticks, most_threads

    try:
        took, ticks, most_threads = asyncio.run(main())
    finally:
        client.close()
    assert took >= 0.25, f"aensure() returned after {took:.3f}s, before the boot's 0.3 s"
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    # A blocked loop would show one gap of ~300 ms; 100 ms allows for a loaded machine.
    assert max(gaps) < 0.1, f"the loop stalled for {max(gaps) * 1000:.0f} ms"
    assert len(ticks) >= 20, len(ticks)
    assert most_threads == threads_before, "aensure() must not start a thread"
    assert the_status(pool, "slow").state == "ready"
    assert len(starts(starts_file)) == 1


@pytest.mark.parametrize("through", ["pool", "client"])
def test_aensure_of_a_ready_worker_returns_without_suspending(make_pool: Any, through: str) -> None:
    pool = make_pool([spec("w", "idle", num=1)])
    client = pool if through == "pool" else bgpool.connect(pool.address)
    try:
        for names in ("w", ["w"]):
            coro = client.aensure(names)
            with pytest.raises(StopIteration):  # done at the first step: nothing awaited
                coro.send(None)
        status = client.astatus()
        with pytest.raises(StopIteration) as done:
            status.send(None)
        assert done.value.value == client.status()
    finally:
        if client is not pool:
            client.close()


# -- every error of ensure() has its async twin --------------------------------------


@pytest.mark.parametrize(("args", "kwargs"), validation.TYPE_ERRORS + validation.VALUE_ERRORS)
def test_aensure_refuses_bad_arguments_as_ensure_does(
    lazy_pool: Any, sentinel_dir: Path, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    kind, _ = twins(
        lambda: lazy_pool.ensure(*args, **kwargs), lambda: lazy_pool.aensure(*args, **kwargs)
    )
    assert kind in (TypeError, ValueError)
    validation.assert_nothing_started(lazy_pool, sentinel_dir)


@pytest.fixture
def failing_pool(make_pool: Any) -> Any:
    """Each case twice: `<case>-sync` for ensure(), `<case>-async` for aensure()."""
    cases: dict[str, dict[str, Any]] = {
        "never": dict(worker="never_ready"),
        "bad": dict(worker="crash_at_boot", max_consecutive_failures=3),
        "boot": dict(worker="crash_at_boot", max_consecutive_failures=-1),
    }
    return make_pool(
        [spec(f"{case}-{form}", **kw) for case, kw in cases.items() for form in ("sync", "async")]
    )


def same_error(pool: Any, name: str, **kwargs: Any) -> tuple[type, str, Any]:
    """ensure(`name`-sync) and aensure(`name`-async) raise the same type and
    message (the name aside); return them and the async error's diagnostics."""
    errors: dict[str, BaseException] = {}
    for form, call in (("sync", pool.ensure), ("async", None)):
        try:
            if call is not None:
                call(f"{name}-{form}", **kwargs)
            else:
                run(pool.aensure(f"{name}-{form}", **kwargs))
        except bgpool.BgpoolError as exc:
            errors[form] = exc
    assert set(errors) == {"sync", "async"}, errors
    sync, asyn = errors["sync"], errors["async"]
    assert type(asyn) is type(sync)
    assert str(asyn) == str(sync).replace(f"{name}-sync", f"{name}-async")
    return type(asyn), str(asyn), getattr(asyn, "diagnostics", None)


def test_aensure_raises_ensure_timeout_as_ensure_does(failing_pool: Any) -> None:
    kind, message, diagnostics = same_error(failing_pool, "never", timeout=0.5)
    assert kind is bgpool.EnsureTimeout
    assert message == (
        'background worker "never-async" did not call get_worker_handle() within 0.5s'
    )
    assert diagnostics is not None and diagnostics.name == "never-async"


def test_aensure_raises_worker_aborted_as_ensure_does(failing_pool: Any) -> None:
    kind, message, diagnostics = same_error(failing_pool, "bad")
    assert kind is bgpool.WorkerAborted
    assert "3 consecutive failures" in message and "RuntimeError: boom" in message
    assert diagnostics is not None and diagnostics.last_error.message == "boom"


def test_aensure_fail_fast_raises_worker_boot_failed_as_ensure_does(failing_pool: Any) -> None:
    kind, message, diagnostics = same_error(failing_pool, "boot", fail_fast=True)
    assert kind is bgpool.WorkerBootFailed
    assert 'background worker "boot-async" failed to boot: attempt 1 failed' in message
    assert diagnostics is not None and diagnostics.last_error.type == "RuntimeError"


def test_aensure_raises_worker_not_declared_and_scope_errors_as_ensure_does(
    failing_pool: Any,
) -> None:
    kind, message = twins(
        lambda: failing_pool.ensure(["never-sync", "nope"]),
        lambda: failing_pool.aensure(["never-sync", "nope"]),
    )
    assert kind is bgpool.WorkerNotDeclared and "nope" in message
    kind, message = twins(
        lambda: failing_pool.ensure("never-sync", scope="no-such-label"),
        lambda: failing_pool.aensure("never-sync", scope="no-such-label"),
    )
    assert kind is ValueError and "no-such-label" in message
    kind, _ = twins(
        lambda: failing_pool.ensure("never-sync", scope=3),
        lambda: failing_pool.aensure("never-sync", scope=3),
    )
    assert kind is TypeError
    assert the_status(failing_pool, "never-sync").attempts == 0


def test_aensure_raises_catch_all_limit_reached_as_ensure_does(make_pool: Any) -> None:
    pool = make_pool([spec(None, "tenant", max_instances=1)])
    kind, message = twins(lambda: pool.ensure(["t1", "t2"]), lambda: pool.aensure(["t1", "t2"]))
    assert kind is bgpool.CatchAllLimitReached and "t2" in message
    assert pool.status() == [], "nothing started"


def test_adiagnostics_and_astatus_answer_as_the_blocking_forms(make_pool: Any) -> None:
    pool = make_pool([spec("w", "idle", num=1), spec("bad", "crash_at_boot",
                                                     max_consecutive_failures=1)])  # fmt: skip
    with pytest.raises(bgpool.WorkerAborted):
        pool.ensure("bad")
    client = bgpool.connect(pool.address)
    try:
        for who in (pool, client):
            for name in ("w", "bad"):
                assert run(who.adiagnostics(name)) == who.diagnostics(name)
            assert run(who.astatus()) == who.status()
            bads: tuple[Any, ...] = ("nope", 3, "")  # undeclared, not a str, empty
            for bad in bads:
                twins(
                    functools.partial(who.diagnostics, bad),
                    functools.partial(who.adiagnostics, bad),
                )
    finally:
        client.close()


def test_alogs_answers_as_logs_over_several_frames(make_pool: Any, sentinel_dir: Path) -> None:
    count = 3 * supervisor_logs.BATCH + 7  # a reply of four frames
    env = {"LINES": str(count), "FAILS": "0", "STARTS": str(sentinel_dir / "many.starts")}
    pool = make_pool([spec("many", "obs_chatty", env=env, num=1)])
    wait_for(
        lambda: [line.line for line in pool.logs("many", 1)] == ["attempt 1 ready"],
        timeout=10,
        what="the worker's last line",
    )
    client = bgpool.connect(pool.address)
    try:
        for who in (pool, client):
            found = run(who.alogs("many", 10_000))
            assert found == who.logs("many", 10_000)
            assert len(found) == count + 1
            assert run(who.alogs("many", 2)) == who.logs("many", 2)
            bads: tuple[tuple[Any, ...], ...] = (("nope",), (3,), ("many", -1), ("many", "x"))
            for bad in bads:
                twins(functools.partial(who.logs, *bad), functools.partial(who.alogs, *bad))
    finally:
        client.close()


def test_async_calls_of_a_closed_pool_raise_pool_closed(make_pool: Any) -> None:
    pool = make_pool([spec("w", "idle", num=1), spec("lazy", "idle")])
    client = bgpool.connect(pool.address)
    try:
        pool.shutdown()
        for who in (pool, client):
            for name in ("w", "lazy"):  # the hot path and the cold one
                kind, message = twins(
                    functools.partial(who.ensure, name), functools.partial(who.aensure, name)
                )
                assert kind is bgpool.PoolClosed and message == "pool is closed"
            twins(who.status, who.astatus)
            twins(functools.partial(who.diagnostics, "w"), functools.partial(who.adiagnostics, "w"))
    finally:
        client.close()


def test_aensure_gives_up_on_a_silent_supervisor_as_ensure_does(
    make_pool: Any, sigcont_on_exit: list[int]
) -> None:
    pool = make_pool([spec("lazy-sync", "idle"), spec("lazy-async", "idle")])
    supervisor = supervisor_pid(pool)
    sigcont_on_exit.append(supervisor)
    os.kill(supervisor, signal.SIGSTOP)
    try:
        kind, message, _ = same_error(pool, "lazy", timeout=0.3)
    finally:
        os.kill(supervisor, signal.SIGCONT)
    assert kind is bgpool.EnsureTimeout
    assert "lazy-async" in message


# -- cancelling abandons the wait, nothing else ----------------------------------------


def test_cancelling_aensure_abandons_only_the_wait(make_pool: Any, sentinel_dir: Path) -> None:
    starts_file = sentinel_dir / "slow.starts"
    pool = make_pool([spec("slow", "slow_ready", env={"DELAY": "0.5", "STARTS": str(starts_file)})])

    # The supervisor's end of each control connection is bound to the address.
    def connections() -> int:
        return len(unix_socket_inodes(pool.address)) - 1  # less the listener

    wait_for(lambda: connections() == 0, what="start()'s connection to be dropped")
    fds_before = len(os.listdir("/proc/self/fd"))

    async def main() -> float:
        waiting = asyncio.create_task(pool.aensure("slow"))
        while not starts(starts_file):  # the worker is booting: the request is in
            await asyncio.sleep(0.01)
        assert not waiting.done()
        assert connections() == 1, "our request"
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert the_status(pool, "slow").state == "starting"
        # The worker still becomes ready, and a later aensure() returns at once.
        while the_status(pool, "slow").state != "ready":
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        await pool.aensure("slow")
        return time.monotonic() - t0

    assert asyncio.run(main()) < 0.01
    assert len(starts(starts_file)) == 1, "cancelling must not restart the worker"
    assert len(os.listdir("/proc/self/fd")) == fds_before, "the connection was not closed"
    wait_for(lambda: connections() == 0, what="the supervisor to drop the abandoned connection")
    pool.ensure("slow")
    assert pool.diagnostics("slow").state == "ready"


# -- async worker targets --------------------------------------------------------------


@pytest.mark.parametrize("target", ["publisher", "returns_coroutine"])
def test_an_async_target_runs_publishes_and_sees_the_drain(
    make_pool: Any, sentinel_dir: Path, target: str
) -> None:
    report = sentinel_dir / "report.json"
    pool = make_pool(
        [
            WorkerSpec(
                name="a",
                target=f"fixtures.async_workers:{target}",
                ready_on="vars",
                env={"REPORT": str(report)},
            )
        ]
    )
    pool.ensure("a")  # ready_on="vars": the handle and a set_vars(), both from the coroutine
    worker = the_status(pool, "a").pid
    assert dict(published(pool, "a")) == {"pid": worker, "in_loop": True}
    assert wait_for(lambda: read_json(report), what="wait_async(0.05)") == {"early": False}
    pool.shutdown()
    assert read_json(report) == {"early": False, "stopped": True, "after": True}


def test_an_async_targets_crash_shows_its_file_and_line(make_pool: Any) -> None:
    pool = make_pool(
        [WorkerSpec(name="c", target="fixtures.async_workers:crash_after_await", num=1)]
    )
    diagnostics = wait_for(
        lambda: (d := pool.diagnostics("c")).last_error is not None and d, what="the crash"
    )
    error = diagnostics.last_error
    assert error.type == "RuntimeError" and error.message == "async boom"
    assert error.filename == str(FIXTURES / "async_workers.py")
    assert error.lineno == source_line(async_workers.crash_after_await, "ASYNC_BOOM_LINE")
    frames = [line for line in error.traceback.splitlines() if line.lstrip().startswith("File ")]
    assert frames and "async_workers.py" in frames[0], error.traceback
    assert not any(f"{os.sep}asyncio{os.sep}" in frame for frame in frames), error.traceback
    assert diagnostics.last_exit_status == 1
