"""Fixtures for bgpool's black-box suite.

``no_leaks`` (autouse) fails a test that leaves anything behind:

- a child process (or zombie) of the test process;
- any other process started during the test, wherever it was reparented: every
  process the test starts inherits ``BGPOOL_TEST_TOKEN`` from our environment (SPEC:
  workers inherit the application's environment), so a scan of ``/proc/*/environ``
  finds escaped grandchildren and orphans;
- a new shared-memory segment ``/dev/shm/bgp_*`` (``/dev/shm`` is shared with
  whatever else runs on the machine: a new segment still mapped by a live process
  that is not ours belongs to someone else and is ignored);
- a new ``bgpool-*`` directory in the temp dir (the session uses a private temp dir,
  exported as ``TMPDIR`` so the supervisor and CLI subprocesses use it too);
- more open file descriptors than before.

``make_pool`` builds pools and always shuts them down, even when the test failed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import shm_in_use_by_others

import bgpool

SHM = Path("/dev/shm")
REAP_DEADLINE = 3.0
TOKEN_VAR = "BGPOOL_TEST_TOKEN"
SESSION = uuid.uuid4().hex[:12]

# A private temp dir for the whole session (short: AF_UNIX paths are limited).
_TMP = tempfile.mkdtemp(prefix="bgpt-", dir="/tmp")
os.environ["TMPDIR"] = _TMP
tempfile.tempdir = _TMP


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_TMP, ignore_errors=True)


def _shm_entries() -> set[str]:
    try:
        return {p.name for p in SHM.iterdir() if p.name.startswith("bgp_")}
    except FileNotFoundError:
        return set()


def _socket_dirs() -> set[str]:
    tmp = Path(tempfile.gettempdir())
    return {p.name for p in tmp.iterdir() if p.name.startswith("bgpool-")}


def _fds() -> dict[int, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listdir's own fd, closed by now
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
    return out


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid} ({proc.status()}): {' '.join(proc.cmdline())[:200]}"
    except psutil.Error:
        return f"pid {proc.pid} (gone)"


def _kill_tree(procs: list[psutil.Process]) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    for proc in procs:
        try:
            if proc.ppid() == os.getpid():
                os.waitpid(proc.pid, 0)
        except (psutil.Error, ChildProcessError):
            pass


def _our_processes() -> list[psutil.Process]:
    """Live processes (not zombies, not us) started under this session's token."""
    marker = f"{TOKEN_VAR}={SESSION}-".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker not in f.read():
                    continue
            proc = psutil.Process(int(entry))
            if proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    me = psutil.Process()
    assert not me.children(recursive=True), "a previous test left a child process"
    token_before = os.environ.get(TOKEN_VAR)
    os.environ[TOKEN_VAR] = f"{SESSION}-{uuid.uuid4().hex[:8]}"
    shm_before = _shm_entries()
    dirs_before = _socket_dirs()
    fds_before = _fds()
    address_before = os.environ.get("BGPOOL_ADDRESS")

    yield

    problems: list[str] = []

    deadline = time.monotonic() + REAP_DEADLINE
    kids = me.children(recursive=True)
    while kids and time.monotonic() < deadline:
        time.sleep(0.02)
        kids = me.children(recursive=True)
    if kids:
        problems.append(
            "child processes left behind:\n  " + "\n  ".join(_describe(p) for p in kids)
        )
        _kill_tree(kids)

    escaped = _our_processes()
    while escaped and time.monotonic() < deadline:
        time.sleep(0.02)
        escaped = _our_processes()
    if escaped:
        problems.append(
            "processes started by the test still running elsewhere (orphans):\n  "
            + "\n  ".join(_describe(p) for p in escaped)
        )
        _kill_tree(escaped)

    new_shm = _shm_entries() - shm_before
    shm_deadline = time.monotonic() + 1.0
    while new_shm:
        new_shm = (new_shm & _shm_entries()) - shm_in_use_by_others(p.pid for p in _our_processes())
        if not new_shm or time.monotonic() >= shm_deadline:
            break
        time.sleep(0.05)
    if new_shm:
        problems.append(f"shared-memory segments left behind: {sorted(new_shm)}")
        for name in new_shm:
            with contextlib.suppress(FileNotFoundError):
                (SHM / name).unlink()

    new_dirs = _socket_dirs() - dirs_before
    if new_dirs:
        problems.append(f"socket directories left behind: {sorted(new_dirs)}")
        for name in new_dirs:
            shutil.rmtree(Path(tempfile.gettempdir()) / name, ignore_errors=True)

    fds_after = _fds()
    if len(fds_after) > len(fds_before):
        extra = {fd: link for fd, link in fds_after.items() if fds_before.get(fd) != link}
        problems.append(
            f"file descriptors left open: {len(fds_before)} before, {len(fds_after)} after; "
            f"new or changed: {extra}"
        )

    for var, value in ((TOKEN_VAR, token_before), ("BGPOOL_ADDRESS", address_before)):
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value

    if problems:
        pytest.fail("resources leaked by this test:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture
def make_pool(no_leaks: None) -> Iterator[Callable[..., Any]]:
    """Factory: ``make_pool(workers, start=True, **PoolConfig kwargs)`` or
    ``make_pool(config=PoolConfig(...))``. Every pool made is shut down afterwards.

    Defaults differ from PoolConfig's to keep a misbehaving library from stalling
    the suite: ``grace_period=5.0`` and ``ensure_timeout=10.0`` unless given.
    """
    pools: list[Any] = []

    def factory(
        workers: list[Any] | None = None,
        *,
        config: Any = None,
        start: bool = True,
        **kwargs: Any,
    ) -> Any:
        if config is None:
            kwargs.setdefault("grace_period", 5.0)
            kwargs.setdefault("ensure_timeout", 10.0)
            config = bgpool.PoolConfig(workers=workers or [], **kwargs)
        pool = bgpool.Pool(config)
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
