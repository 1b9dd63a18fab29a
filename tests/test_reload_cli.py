"""Reloading from the command line (SPEC, "Reload: new code and new declarations take
effect"): ``bgpool run CONFIG`` re-imports CONFIG on SIGHUP (and on ``bgpool
reload``), applies it and restarts the remaining workers on new code; a config that
fails to load changes nothing and says why on stderr; ``bgpool restart NAME``
restarts only that worker.

Each test writes its config file and its worker modules into its own directory
(``fixtures/reload_fixtures.py``): ``bgpool run`` puts the config's directory on
``sys.path``, so the modules beside it import.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, BgpoolRun, alive, gone, state, subprocess_env, wait_for

import bgpool
from bgpool import WorkerSpec
from fixtures.reload_fixtures import Sources, Start, starts, write_source

CONFIG_HEAD = '''"""A bgpool run config written by tests/test_reload_cli.py."""

import os

from bgpool import PoolConfig, WorkerSpec

HERE = os.path.dirname(os.path.abspath(__file__))


def w(name, target, num=1, v="-"):
    env = {"LOG": os.path.join(HERE, name + ".log"), "V": v}
    return WorkerSpec(name=name, target=target, num=num, env=env)

'''


def config_text(workers: list[tuple[str, str, int, str]], extra: str = "") -> str:
    """A config declaring ``(name, target, num, V)`` workers; ``extra`` goes before it."""
    lines = [f"    w({name!r}, {target!r}, {num}, {v!r})," for name, target, num, v in workers]
    return (
        CONFIG_HEAD
        + extra
        + "config = PoolConfig(\n"
        + "    grace_period=5.0, restart_grace_period=5.0, ensure_timeout=20.0,\n"
        + "    workers=[\n"
        + "\n".join("    " + line for line in lines)
        + "\n    ],\n)\n"
    )


def cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``python -m bgpool ARGS`` (no ``$BGPOOL_ADDRESS``: pass ``--address``)."""
    env = subprocess_env()
    env.pop("BGPOOL_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "bgpool", *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class Running:
    """A ``bgpool run`` of a config in ``directory``, and a client to its pool."""

    def __init__(self, directory: Path, run: BgpoolRun) -> None:
        self.directory = directory
        self.config = directory / "reload_config.py"
        self.run = run
        self.address = run.address()
        self.client = bgpool.connect(self.address)

    def write(self, text: str) -> None:
        write_source(self.config, text)

    def log(self, name: str) -> Path:
        return self.directory / f"{name}.log"

    def pid(self, name: str) -> int | None:
        found = [s for s in self.client.status() if s.name == name]
        if len(found) == 1 and state(found[0].state) == "ready":
            return found[0].pid
        return None

    def ready(self, *names: str) -> dict[str, int]:
        """Each name's pid, once all are ready."""

        def check() -> dict[str, int] | None:
            pids = {n: self.pid(n) for n in names}
            return {n: p for n, p in pids.items() if p is not None} if all(pids.values()) else None

        try:
            return wait_for(check, timeout=20, what=f"{names} ready")
        except AssertionError:
            raise AssertionError(
                f"{names} not ready: {self.client.status()!r}; stderr {self.run.stderr()!r}"
            ) from None

    def start_of(self, name: str, pid: int) -> Start:
        found = [s for s in starts(self.log(name)) if s.pid == pid]
        assert len(found) == 1, (name, pid, starts(self.log(name)))
        return found[0]

    def undeclared(self, name: str) -> bool:
        try:
            self.client.diagnostics(name)
        except bgpool.WorkerNotDeclared:
            return True
        return False

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def running(sentinel_dir: Path) -> Iterator[Callable[..., Running]]:
    """``running(workers)``: a ``bgpool run`` of a config declaring ``workers``, in
    ``<sentinels>/run0`` (where ``beside_config`` writes the modules). Always stopped."""
    runs: list[BgpoolRun] = []
    clients: list[Running] = []

    def start(workers: list[tuple[str, str, int, str]]) -> Running:
        directory = sentinel_dir / "run0"
        directory.mkdir(exist_ok=True)
        write_source(directory / "reload_config.py", config_text(workers))
        run = BgpoolRun(str(directory / "reload_config.py"), directory)
        runs.append(run)
        r = Running(directory, run)
        clients.append(r)
        return r

    try:
        yield start
    finally:
        for r in clients:
            r.close()
        for run in runs:
            run.close()


@pytest.fixture
def beside_config(sentinel_dir: Path) -> Sources:
    """Worker modules beside the config file (``bgpool run`` puts its directory on
    ``sys.path``)."""
    return Sources(sentinel_dir / "run0")


def stays(holds: Callable[[], bool], seconds: float, what: str) -> None:
    """Fail as soon as ``holds()`` is false, watching it for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert holds(), what
        time.sleep(0.02)


# -------------------------------------------------------------------- bgpool run


@pytest.mark.parametrize("trigger", ["SIGHUP", "bgpool reload"])
def test_reload_applies_the_edited_config(
    running: Callable[..., Running], beside_config: Sources, trigger: str
) -> None:
    mod = beside_config.module("cli")
    r = running([("keep", mod.target, 1, "1"), ("change", mod.target, 1, "1"),
                 ("gone", mod.target, 1, "1")])  # fmt: skip
    old = r.ready("keep", "change", "gone")
    beside_config.edit(mod, "v2")
    r.write(config_text([("keep", mod.target, 1, "1"), ("change", mod.target, 1, "2"),
                         ("new", mod.target, 1, "1")]))  # fmt: skip

    if trigger == "SIGHUP":
        r.run.proc.send_signal(signal.SIGHUP)
    else:
        proc = cli("reload", "--address", r.address)
        assert proc.returncode == 0, (proc.stdout, proc.stderr)

    wait_for(lambda: r.undeclared("gone"), timeout=20, what="gone undeclared")
    wait_for(lambda: gone(old["gone"]), timeout=10, what="gone drained")
    new = r.ready("new")["new"]
    assert r.start_of("new", new).version == "v2"

    def moved(name: str) -> int | None:
        pid = r.pid(name)
        return pid if pid is not None and pid != old[name] else None

    change = wait_for(lambda: moved("change"), timeout=20, what="change restarted")
    assert r.start_of("change", change) == Start(change, "v2", "2", 0)
    # every remaining worker is restarted on a new generation, the unchanged one too
    keep = wait_for(lambda: moved("keep"), timeout=20, what="keep restarted on new code")
    assert r.start_of("keep", keep).version == "v2"
    assert r.run.proc.poll() is None, r.run.stderr()
    assert "Traceback" not in r.run.stderr()
    r.close()
    assert r.run.stop() == 0


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        ('raise RuntimeError("reload config broken on purpose")\n', "broken on purpose"),
        ('raise SystemExit("reload config exits on purpose")\n', "exits on purpose"),
        ("config = PoolConfig(workers=[WorkerSpec(name='x', target='no_such_mod_zq:run')])\n",
         "no_such_mod_zq"),
        ("config = 'not a PoolConfig'\n", "must define config"),
    ],
    ids=["raises", "exits", "invalid", "no-config"],
)  # fmt: skip
def test_config_that_fails_to_load_changes_nothing(
    running: Callable[..., Running], beside_config: Sources, broken: str, reason: str
) -> None:
    mod = beside_config.module("stay")
    r = running([("a", mod.target, 1, "1"), ("b", mod.target, 1, "1")])
    old = r.ready("a", "b")
    beside_config.edit(mod, "v2")
    if broken.startswith("config ="):
        r.write(CONFIG_HEAD + broken)
    else:
        r.write(config_text([("a", mod.target, 1, "2")], extra=broken))

    r.run.proc.send_signal(signal.SIGHUP)

    wait_for(lambda: reason in r.run.stderr(), timeout=20, what=f"{reason!r} on stderr")
    stays(
        lambda: {n: r.pid(n) for n in ("a", "b")} == old,
        1.0,
        f"a config that failed to load changed the pool: {r.client.status()!r}",
    )
    assert r.run.proc.poll() is None, r.run.stderr()
    assert [s.pid for s in starts(r.log("a"))] == [old["a"]]
    assert all(alive(p) for p in old.values())

    # the pool still reloads once the file is fixed
    r.write(config_text([("a", mod.target, 1, "1"), ("b", mod.target, 1, "1"),
                         ("c", mod.target, 1, "1")]))  # fmt: skip
    r.run.proc.send_signal(signal.SIGHUP)
    assert r.start_of("c", r.ready("c")["c"]).version == "v2"
    r.close()
    assert r.run.stop() == 0


# --------------------------------------------------------------- bgpool restart


def _pid(pool: Any, name: str, scope: str = "") -> int:
    found = [s for s in pool.status() if s.name == name and s.scope == scope]
    assert len(found) == 1 and found[0].pid is not None, found
    return int(found[0].pid)


def test_restart_command_restarts_only_the_named_worker(
    make_pool: Callable[..., Any], sources: Sources, tmp_path: Path
) -> None:
    mod = sources.module("cmd")
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    pool = make_pool(
        [
            WorkerSpec(name="a", target=mod.target, num=1, env={"LOG": str(log_a)}),
            WorkerSpec(name="b", target=mod.target, num=1, env={"LOG": str(log_b)}),
        ]
    )
    a0, b0 = _pid(pool, "a"), _pid(pool, "b")
    sources.edit(mod, "v2")

    proc = cli("restart", "a", "--address", pool.address)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)

    a1 = _pid(pool, "a")
    assert a1 != a0
    assert [s.version for s in starts(log_a) if s.pid == a1] == ["v2"]
    assert _pid(pool, "b") == b0
    assert [s.pid for s in starts(log_b)] == [b0]

    proc = cli("restart", "--address", pool.address)  # no name: all of them
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert _pid(pool, "a") != a1
    b1 = _pid(pool, "b")
    assert b1 != b0
    assert [s.version for s in starts(log_b) if s.pid == b1] == ["v2"]


def test_restart_command_with_scope(
    make_pool: Callable[..., Any], sources: Sources, tmp_path: Path
) -> None:
    mod = sources.module("scoped")
    api = bgpool.next_scope("api")
    pool = make_pool(
        [
            WorkerSpec(name="svc", target=mod.target, num=1),
            WorkerSpec(name="svc", target=mod.target, num=1, scope=api),
        ]
    )
    g0, a0 = _pid(pool, "svc"), _pid(pool, "svc", "api")
    proc = cli("restart", "svc", "--scope", "api", "--address", pool.address)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert _pid(pool, "svc", "api") != a0
    assert _pid(pool, "svc") == g0


def test_restart_command_failures_exit_1(
    make_pool: Callable[..., Any], sources: Sources, tmp_path: Path
) -> None:
    mod = sources.module("fails")
    pool = make_pool([WorkerSpec(name="a", target=mod.target, num=1)])
    a0 = _pid(pool, "a")

    proc = cli("restart", "nope", "--address", pool.address)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert 'no background worker configured for name "nope"' in proc.stderr
    assert _pid(pool, "a") == a0

    sources.break_(mod, "import")
    proc = cli("restart", "a", "--address", pool.address)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert '"a"' in proc.stderr and "ImportError" in proc.stderr, proc.stderr
    assert "bgpool/cli" not in proc.stderr, proc.stderr  # the error, not a crash of bgpool's
    assert _pid(pool, "a") == a0  # its code failed to load: left running
    assert alive(a0)
