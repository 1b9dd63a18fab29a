"""Load: 32 threads of the application and 4 other processes (2 threads each,
``fixtures/rel_load_client.py``) call ``ensure()`` (one name or a batch),
``status()`` and ``diagnostics()`` in a loop while workers crash on their own
(``fixtures.workers:crashy``) and are SIGKILLed at random (a killer thread).

Checked: no call raises (every name was ready once, so ``ensure()`` is satisfied
through crash restarts: readiness is sticky), no call hangs, the table is consistent
at every sample (one row per instance, a pid exactly in the running states, no pid
twice), and once the load stops: exactly one process per instance, the supervisor's
children are the table's pids (no zombie, no stray), and the table's counters match
what the workers recorded (attempts = processes started, restarts = attempts minus
instances, crashes = the kills plus the crashes of their own).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    ROOT,
    live_children,
    read_json,
    reaping,
    resources,
    starts,
    state,
    subprocess_env,
    supervisor_pid,
    wait_for,
    zombie_children,
)
from prometheus_client import CollectorRegistry

import bgpool
import bgpool.metrics
from fixtures.rel_load_client import hammer

LAZY = [f"lazy-{i}" for i in range(4)]
TENANTS = [f"t-{i}" for i in range(6)]
NAMES = ["steady", "crashy", *LAZY, *TENANTS]
INSTANCES = {"steady": 2}  # every other name: 1
RUNNING = {"starting", "ready", "stopping"}
SLOWEST_CALL = 5.0


def _config(d: Path) -> list[bgpool.WorkerSpec]:
    notes = {"NOTES": str(d / "notes")}
    return [
        bgpool.WorkerSpec(name="steady", target="fixtures.workers:idle", num=2, env=notes),
        bgpool.WorkerSpec(
            name="crashy",
            target="fixtures.workers:crashy",
            num=1,
            env={**notes, "CRASH_FLAG": str(d / "crash"), "STARTS": str(d / "crashy.starts")},
        ),
        *(bgpool.WorkerSpec(name=n, target="fixtures.workers:idle", env=notes) for n in LAZY),
        bgpool.WorkerSpec(target="fixtures.workers:idle", max_instances=8, env=notes),
    ]


def _noted(d: Path) -> dict[str, set[int]]:
    """name -> pids of every process started for it (from the workers' notes)."""
    out: dict[str, set[int]] = defaultdict(set)
    for p in (d / "notes").iterdir():
        key, _instance, pid = p.name.split("~")
        out[bytes.fromhex(key).decode()].add(int(pid))
    return out


def _table_problems(rows: list[Any]) -> list[str]:
    problems = []
    per_name = Counter(r.name for r in rows)
    for name, count in per_name.items():
        if count != INSTANCES.get(name, 1):
            problems.append(f"{count} rows for {name}")
    pids = [r.pid for r in rows if r.pid is not None]
    if len(pids) != len(set(pids)):
        problems.append(f"a pid in two rows: {sorted(pids)}")
    for r in rows:
        if (r.pid is not None) != (state(r.state) in RUNNING):
            problems.append(f"{r.name}.{r.instance}: state {r.state} with pid {r.pid}")
    if sum(1 for r in rows if r.name in TENANTS) > 8:
        problems.append("more catch-all names than max_instances")
    return problems


def _run_load(make_pool: Any, sentinel_dir: Path, seconds: float) -> None:
    (sentinel_dir / "notes").mkdir()
    flag = sentinel_dir / "crash"
    flag.write_text("")
    pool = make_pool(_config(sentinel_dir), grace_period=5.0)
    res = resources(pool)
    with reaping(lambda: res.address):
        _load_and_check(pool, sentinel_dir, seconds, flag)
        pool.shutdown()
        assert not res.left_behind()


def _load_and_check(pool: Any, d: Path, seconds: float, flag: Path) -> None:
    sup = supervisor_pid(pool)
    stop = threading.Event()
    killed: dict[str, set[int]] = defaultdict(set)
    problems: list[str] = []

    def killer() -> None:
        rng = random.Random(7)
        while not stop.wait(0.1):
            rows = [r for r in pool.status() if state(r.state) == "ready" and r.pid]
            if rows:
                row = rng.choice(rows)
                try:
                    os.kill(row.pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                killed[row.name].add(row.pid)

    def sampler() -> None:
        while not stop.wait(0.02):
            problems.extend(_table_problems(pool.status()))

    procs = []
    for i in range(4):
        plan = {
            "seconds": seconds,
            "names": NAMES,
            "threads": 2,
            "seed": i + 1,
            "result": str(d / f"client{i}.json"),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "fixtures.rel_load_client", json.dumps(plan)],
                cwd=ROOT,
                env=subprocess_env(),
                stdin=subprocess.DEVNULL,
            )
        )
    out: dict[str, Any] = {"calls": {}, "errors": [], "slowest": 0.0, "lock": threading.Lock()}
    until = time.monotonic() + seconds
    threads = [
        threading.Thread(target=hammer, args=(pool, NAMES, until, random.Random(100 + i), out))
        for i in range(32)
    ]
    helpers_ = [threading.Thread(target=killer), threading.Thread(target=sampler)]
    try:
        for t in threads + helpers_:
            t.start()
        for t in threads:
            t.join(seconds + 60)
            assert not t.is_alive(), "a load thread hangs"
    finally:
        stop.set()
        for t in helpers_:
            t.join(30)
        for p in procs:
            try:
                p.wait(seconds + 60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    results = [read_json(d / f"client{i}.json") for i in range(4)]
    assert all(p.returncode == 0 for p in procs), [p.returncode for p in procs]
    errors = out["errors"] + [e for r in results for e in r["errors"]]
    assert not errors, f"{len(errors)} calls failed, e.g. {errors[:5]}"
    slowest = max([out["slowest"]] + [r["slowest"] for r in results])
    assert slowest < SLOWEST_CALL, f"a call took {slowest:.2f}s"
    calls = sum(out["calls"].values()) + sum(sum(r["calls"].values()) for r in results)
    assert calls > 500, f"only {calls} calls in {seconds}s"
    assert not problems, f"inconsistent table samples: {problems[:10]}"
    assert sum(len(p) for p in killed.values()) >= seconds * 3, f"too few kills: {killed}"
    print(
        f"load: {calls} calls in {seconds}s, slowest {slowest:.3f}s, "
        f"{sum(len(p) for p in killed.values())} kills, {len(problems)} table samples bad"
    )

    # Quiesce: no more crashes; every instance comes back up.
    flag.unlink()
    t_flag = time.monotonic()
    pool.ensure(NAMES, timeout=20)

    def settled() -> bool:
        rows = pool.status()
        crashy_starts = starts(d / "crashy.starts")
        return (
            all(state(r.state) == "ready" for r in rows)
            and crashy_starts[-1][1] > t_flag
            and not zombie_children(sup)
        )

    wait_for(settled, timeout=10, what="every instance ready again")
    rows = pool.status()
    assert not _table_problems(rows), _table_problems(rows)
    assert {r.name for r in rows} == set(NAMES)
    assert live_children(sup) == {r.pid for r in rows}, "supervisor children != table pids"

    registry = CollectorRegistry()
    bgpool.metrics.collector(pool, registry)
    noted = _noted(d)
    for name in NAMES:
        mine = [r for r in rows if r.name == name]
        attempts = sum(r.attempts for r in mine)
        assert len(noted[name]) == attempts, (name, sorted(noted[name]), mine)
        assert {r.pid for r in mine} <= noted[name]
        label = {"worker": f"m#:{name}"}
        restarts = registry.get_sample_value("bgpool_worker_restarts_total", label)
        crashes = registry.get_sample_value("bgpool_worker_crashes_total", label)
        assert restarts == attempts - len(mine), (name, restarts, attempts)
        if name == "crashy":
            # every run but the current one ended in a crash (its own, or a kill)
            assert crashes == attempts - 1, (name, crashes, attempts)
        else:
            assert killed[name] <= noted[name]
            assert crashes == len(killed[name]), (name, crashes, sorted(killed[name]))


def test_load_quick(make_pool: Any, sentinel_dir: Path) -> None:
    _run_load(make_pool, sentinel_dir, seconds=3.0)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_load_ten_seconds(make_pool: Any, sentinel_dir: Path) -> None:
    _run_load(make_pool, sentinel_dir, seconds=10.0)
