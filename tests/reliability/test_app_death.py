"""SIGKILL the application process that owns the Pool (a subprocess running
``fixtures/rel_owner.py``). The supervisor notices (it watches its owner's pidfd),
drains every worker (EOF on the handle, then SIGTERM/SIGKILL after
``grace_period``), exits and removes the table, the vars segments, the socket and
its directory. Nothing survives, not even a setsid grandchild.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import (
    ROOT,
    LeakCheck,
    Resources,
    describe,
    gone,
    notes,
    procs_with_address,
    read_json,
    reaping,
    starts,
    subprocess_env,
    wait_for,
)

MARGIN = 1.0
"""Seconds allowed beyond what the drain itself needs (detection, exit, cleanup)."""


class Owner:
    """The application process: ``python -m fixtures.rel_owner PLAN``."""

    def __init__(self, plan: dict[str, Any], directory: Path) -> None:
        env = subprocess_env()
        env.pop("BGPOOL_ADDRESS", None)
        self.stderr_path = directory / "owner.stderr"
        self.info_path = directory / "owner.json"
        plan = {**plan, "info": str(self.info_path)}
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fixtures.rel_owner", json.dumps(plan)],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        self.address: str | None = None

    def info(self) -> dict[str, Any]:
        def ready() -> Any:
            assert self.proc.poll() is None, f"the owner exited: {self.stderr()}"
            return read_json(self.info_path)

        data: dict[str, Any] = wait_for(ready, timeout=30, what="the owner's pool")
        self.address = data["address"]
        return data

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def owner(sentinel_dir: Path) -> Iterator[Any]:
    made: list[Owner] = []

    def make(plan: dict[str, Any]) -> Owner:
        made.append(Owner(plan, sentinel_dir))
        return made[-1]

    yield make
    for o in made:
        if o.proc.poll() is None:
            o.kill()


def _worker(name: str | None, target: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "target": target, **kw}


def _check_everything_goes(res: Resources, bound: float, owner: Owner) -> None:
    """After the owner's SIGKILL: every process of the pool exits within ``bound``
    seconds, and the table, vars segments, socket and directory are removed."""
    with reaping(lambda: res.address):
        owner.kill()

        def over() -> bool:
            return (
                gone(res.supervisor)
                and not procs_with_address(res.address)
                and not res.left_behind()
            )

        try:
            wait_for(over, timeout=bound, what="the pool to drain and clean up")
        except AssertionError:
            raise AssertionError(
                f"{bound}s after the application's SIGKILL: processes "
                f"{describe(procs_with_address(res.address))}; resources {res.left_behind()}; "
                f"owner stderr: {owner.stderr()[-2000:]}"
            ) from None


def test_application_killed_while_workers_run(
    owner: Any, sentinel_dir: Path, no_leaks: LeakCheck
) -> None:
    """Well-behaved workers are drained, not killed: each sees EOF on its handle
    (it logs it), and all is over well within the grace period."""
    eof_log = sentinel_dir / "eof.log"
    env = {"EOF_LOG": str(eof_log), "LINGER": "0"}
    app = owner(
        {
            "grace_period": 10.0,
            "workers": [
                _worker("eager", "fixtures.workers:eof_recorder", num=2, env=env),
                _worker("lazy", "fixtures.workers:eof_recorder", env=env),
                _worker(None, "fixtures.workers:eof_recorder", env=env),
            ],
            "ensure": ["lazy", "tenant-a", "tenant-b"],
        }
    )
    info = app.info()
    pids = {s["pid"] for s in info["status"]}
    assert len(pids) == 5 and None not in pids, info["status"]
    res = no_leaks.track(info["address"])
    _check_everything_goes(res, 2.0, app)
    assert {pid for pid, _ in starts(eof_log)} == pids, "every worker saw EOF: a drain"


def test_application_killed_with_hostile_workers(
    owner: Any, sentinel_dir: Path, no_leaks: LeakCheck
) -> None:
    grace = 1.0
    env = {"NOTES": str(sentinel_dir)}
    app = owner(
        {
            "grace_period": grace,
            "workers": [
                _worker("deaf", "fixtures.hostile:ignores_everything", num=1, env=env),
                _worker("blocker", "fixtures.hostile:blocks_sigterm", num=1),
                _worker("forker", "fixtures.hostile:forks_session_leader", num=1, env=env),
                _worker("closer", "fixtures.hostile:closes_its_handle", num=1),
                _worker("quitter", "fixtures.hostile:exits_during_drain", num=1),
                _worker("plain", "fixtures.workers:idle", num=1),
            ],
        }
    )
    info = app.info()
    grandchild = wait_for(lambda: notes(sentinel_dir, "grandchild"), what="grandchild")
    res = no_leaks.track(info["address"])
    assert grandchild[0] in {p.pid for p in procs_with_address(res.address)}
    # grace, SIGTERM (ignored), SIGKILL a second later; the orphaned grandchild is
    # SIGTERMed then SIGKILLed a second later when the supervisor exits.
    _check_everything_goes(res, grace + 2.0 + MARGIN, app)


def test_application_killed_during_start(
    owner: Any, sentinel_dir: Path, no_leaks: LeakCheck
) -> None:
    """The owner dies inside start(), while an eager worker boots."""
    log = sentinel_dir / "slow.starts"
    grace = 1.0
    app = owner(
        {
            "grace_period": grace,
            "ensure_timeout": 120.0,
            "workers": [
                _worker("plain", "fixtures.workers:idle", num=1),
                _worker("slow", "fixtures.workers:never_ready", num=1, env={"STARTS": str(log)}),
            ],
        }
    )
    worker = wait_for(lambda: starts(log), timeout=30, what="the eager worker")[0][0]
    environ = psutil.Process(worker).environ()
    address = environ["BGPOOL_ADDRESS"]
    app.address = address
    res = no_leaks.track(address)
    assert res.supervisor == psutil.Process(worker).ppid()
    assert not app.info_path.exists(), "start() returned although a worker never got ready"
    # never_ready ignores EOF but not SIGTERM: gone at the end of the grace period.
    _check_everything_goes(res, grace + 1.0 + MARGIN, app)


def test_application_killed_while_ensure_waits(
    owner: Any, sentinel_dir: Path, no_leaks: LeakCheck
) -> None:
    log = sentinel_dir / "never.starts"
    grace = 1.0
    app = owner(
        {
            "grace_period": grace,
            "workers": [
                _worker("plain", "fixtures.workers:idle", num=1),
                _worker("never", "fixtures.workers:never_ready", env={"STARTS": str(log)}),
            ],
            "then_ensure": "never",
        }
    )
    info = app.info()
    wait_for(lambda: starts(log), what="the lazy worker")
    res = no_leaks.track(info["address"])
    _check_everything_goes(res, grace + 1.0 + MARGIN, app)
