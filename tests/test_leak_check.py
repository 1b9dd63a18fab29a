"""The suite's own leak check (``helpers.LeakCheck``, run after every test by
conftest's ``no_leaks``): it catches what a test leaves behind of its own, and never
counts what another run on the same machine made (another copy of the suite, a demo:
``/dev/shm`` is shared by everything that runs there).

Each test runs a second LeakCheck of its own around a deliberate leak, and repairs
the leak itself, so that ``no_leaks`` finds the test clean.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    SHM,
    TOKEN_VAR,
    LeakCheck,
    TrackedPool,
    gone,
    read_text,
    spec,
    subprocess_env,
    wait_for,
)

import bgpool


@pytest.fixture
def check() -> LeakCheck:
    """A leak check of this test's own, made now (the test's token: its processes)."""
    return LeakCheck(os.environ[TOKEN_VAR])


@pytest.fixture
def foreign_segments() -> Iterator[list[str]]:
    """Segments as another run leaves them for a moment (its supervisor was killed,
    its shutdown() has not unlinked them yet): a table and a vars segment, mapped
    by nobody. Removed afterwards."""
    table = f"bgp_{secrets.token_hex(8)}"
    names = [table, f"{table}_v0"]
    for name in names:
        os.close(os.open(SHM / name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
    yield names
    for name in names:
        (SHM / name).unlink(missing_ok=True)


def _pool(check: LeakCheck) -> bgpool.Pool:
    config = bgpool.PoolConfig(workers=[spec("eager", "idle", num=1)], grace_period=5.0)
    pool = TrackedPool(config, check)
    pool.start()
    return pool


def test_a_segment_left_by_the_tests_own_pool_is_reported(check: LeakCheck) -> None:
    """The supervisor is SIGKILLed: the Pool removes its table and its socket
    directory at once, but its descriptors are leaks until shutdown(), and so
    are a segment of the pool's left in /dev/shm and a socket directory left
    (made here, as they would be if nobody removed them); once shutdown() ran
    and the directory is gone there are none."""
    pool = _pool(check)
    directory: Path | None = None
    try:
        (table,) = check.tables
        hello = check.track(pool)
        os.kill(hello.supervisor, signal.SIGKILL)
        wait_for(lambda: gone(hello.supervisor), what="the supervisor's death")
        own = Path(pool.address).parent
        wait_for(
            lambda: not (SHM / table).exists() and not own.exists(),
            what="the Pool to remove its table and socket directory",
        )
        left = f"{table}_v0"
        os.close(os.open(SHM / left, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
        directory = Path(tempfile.mkdtemp(prefix="bgpool-"))
        leaks = check.find()
        assert leaks.segments == [left], leaks.report()
        assert leaks.dirs == [directory.name], leaks.report()
        assert leaks.fds, "the Pool still holds its descriptors"
        assert not leaks.children and not leaks.orphans, leaks.report()
        assert f"shared-memory segments left behind: ['{left}']" in leaks.report()
        assert f"socket directories left behind: ['{directory.name}']" in leaks.report()
    finally:
        pool.shutdown()
        if directory is not None:
            directory.rmdir()
    assert check.find().report() == []


def test_another_runs_segments_are_neither_reported_nor_removed(
    check: LeakCheck, foreign_segments: list[str]
) -> None:
    pool = _pool(check)
    try:
        (table,) = check.tables
        leaks = check.find(reap=0.1, unlink=0.1)  # the pool still runs: its table is there
        assert leaks.segments == [table], leaks.report()
        leaks.segments = []  # the pool's own shutdown removes it
        leaks.children = []
        leaks.clean_up()  # and nothing of the other run is touched
        assert all((SHM / name).exists() for name in foreign_segments)
    finally:
        pool.shutdown()
    leaks = check.find()
    assert leaks.report() == []
    assert all((SHM / name).exists() for name in foreign_segments)


def test_a_process_that_escaped_the_test_is_reported_wherever_it_went(
    check: LeakCheck, sentinel_dir: Path
) -> None:
    """A grandchild in its own session, reparented away from the test, still carries
    the test's token in its environment."""
    pidfile = sentinel_dir / "escaped.pid"
    code = textwrap.dedent(
        f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            with open({str(pidfile)!r} + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace({str(pidfile)!r} + ".tmp", {str(pidfile)!r})
            time.sleep(60)
        """
    )
    subprocess.run([sys.executable, "-c", code], env=subprocess_env(), check=True, timeout=30)
    escaped = int(wait_for(lambda: read_text(pidfile), what="the escaped process"))
    leaks = check.find(reap=0.3)
    try:
        assert [p.pid for p in leaks.orphans] == [escaped], leaks.report()
        assert not leaks.children, leaks.report()
        assert any(line.startswith("processes started by the test") for line in leaks.report())
    finally:
        leaks.clean_up()
    wait_for(lambda: gone(escaped), what="the escaped process killed")
    assert check.find().report() == []


def test_a_descriptor_left_open_is_reported(check: LeakCheck) -> None:
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        leaks = check.find(reap=0, unlink=0)
        assert leaks.fds == {fd: os.devnull}, leaks.report()
    finally:
        os.close(fd)
    assert check.find(reap=0, unlink=0).report() == []
