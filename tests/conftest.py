"""Fixtures for bgpool's black-box suite (the helpers they use are in helpers.py).

``no_leaks`` (autouse) fails a test that leaves behind anything it created: a
process, a shared-memory segment of one of its pools, a socket directory, a file
descriptor (``helpers.LeakCheck`` says what counts as the test's own: nothing
another run on the machine made).

``make_pool`` builds pools, tells the leak check about them, and always shuts them
down, even when the test failed. It applies the ``start_method`` fixture: the
``--start-method`` option (fork or spawn; PoolConfig's default when not given), or
both, where a module parametrizes it (tests/test_lifecycle.py).

``sources`` writes worker modules and scripts into the test's directory, on
``sys.path`` while it runs, for tests that edit code (``fixtures/reload_fixtures.py``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import TOKEN_VAR, BgpoolRun, LeakCheck, StartRun, TrackedPool
from redis_helpers import REDIS_SERVER, RedisServer

import bgpool
from fixtures.reload_fixtures import Sources

SESSION = uuid.uuid4().hex[:12]

# A suite started as a background job of a non-interactive shell (`./.ci/run &`
# in a script) inherits SIGINT ignored, and every process it starts would too:
# a Python program started with SIGINT ignored never raises KeyboardInterrupt,
# so `bgpool logs -f` would ignore the Ctrl-C a test sends it (as it should,
# in such a job). The tests mean Ctrl-C at a terminal: the suite takes SIGINT
# as an interactive shell's foreground job does, and its children start with
# the default action (a Python handler is not inherited through exec).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# A private temp dir for the whole session (short: AF_UNIX paths are limited),
# exported so that the supervisors and CLI subprocesses use it too.
_TMP = tempfile.mkdtemp(prefix="bgpt-", dir="/tmp")
os.environ["TMPDIR"] = _TMP
tempfile.tempdir = _TMP


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--start-method",
        choices=["fork", "spawn"],
        default=None,
        help="start every pool's workers this way (default: PoolConfig's own)",
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_TMP, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[LeakCheck]:
    assert not psutil.Process().children(recursive=True), "a previous test left a child process"
    saved = {var: os.environ.get(var) for var in (TOKEN_VAR, "BGPOOL_ADDRESS")}
    token = f"{SESSION}-{uuid.uuid4().hex[:8]}"
    os.environ[TOKEN_VAR] = token
    check = LeakCheck(token)

    yield check

    leaks = check.find()
    leaks.clean_up()
    for var, value in saved.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value
    problems = leaks.report()
    if problems:
        pytest.fail("resources leaked by this test:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture
def sources(tmp_path: Path) -> Iterator[Sources]:
    """Generated workers in ``<tmp>/mods``, on ``sys.path`` while the test runs (the
    supervisor takes the application's ``sys.path`` when it starts)."""
    directory = tmp_path / "mods"
    src = Sources(directory)
    sys.path.insert(0, str(directory))
    try:
        yield src
    finally:
        sys.path.remove(str(directory))


@pytest.fixture
def start_method(request: pytest.FixtureRequest) -> str | None:
    """How ``make_pool``'s pools start workers (None: PoolConfig's default)."""
    method: str | None = request.config.getoption("--start-method")
    return method


@pytest.fixture
def make_pool(no_leaks: LeakCheck, start_method: str | None) -> Iterator[Callable[..., Any]]:
    """Factory: ``make_pool(workers, start=True, **PoolConfig kwargs)`` or
    ``make_pool(config=PoolConfig(...))``. Every pool made is shut down afterwards.

    Defaults differ from PoolConfig's to keep a misbehaving library from stalling
    the suite: ``grace_period=5.0`` and ``ensure_timeout=10.0`` unless given; and
    ``start_method`` is the fixture's unless given (a given config is used as is).
    """
    pools: list[bgpool.Pool] = []

    def factory(
        workers: list[bgpool.WorkerSpec] | None = None,
        *,
        config: bgpool.PoolConfig | None = None,
        start: bool = True,
        **kwargs: Any,
    ) -> bgpool.Pool:
        if config is None:
            kwargs.setdefault("grace_period", 5.0)
            kwargs.setdefault("ensure_timeout", 10.0)
            if start_method is not None:
                kwargs.setdefault("start_method", start_method)
            config = bgpool.PoolConfig(workers=workers or [], **kwargs)
        pool = TrackedPool(config, no_leaks)
        pools.append(pool)
        if start:
            pool.start()
        return pool

    try:
        yield factory
    finally:
        errors: list[BaseException] = []
        for pool in reversed(pools):
            try:
                pool.shutdown()
            except bgpool.PoolClosed:
                pass
            except Exception as exc:  # report after shutting down the others
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def sentinel_dir(tmp_path: Path) -> Path:
    """A fresh directory for the files workers write (pids, reports, logs)."""
    d = tmp_path / "sentinels"
    d.mkdir()
    return d


@pytest.fixture
def sigcont_on_exit(make_pool: Callable[..., Any]) -> Iterator[list[int]]:
    """Pids appended here get SIGCONT at teardown (for tests that SIGSTOP a process),
    before ``make_pool`` shuts the pools down."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of the test's own, on a private unix socket, started; stopped
    (and its directory removed) afterwards, even when the test failed. Request it
    before ``make_pool``, so pools shut down while it still answers."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (./scripts/test installs it)")
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def bgpool_run(sentinel_dir: Path) -> Iterator[StartRun]:
    """``bgpool_run(config, *args)`` starts a ``bgpool run``; each is killed at teardown."""
    runs: list[BgpoolRun] = []

    def start(config: str, *args: str) -> BgpoolRun:
        run = BgpoolRun(config, sentinel_dir, *args, unbuffered=True)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.close()
