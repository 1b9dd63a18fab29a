"""Named pools (``num > 1``: N processes sharing one name, each with its own instance
index and stop pipe, sharing one readiness) and multi-entrypoint declarations (two
names sharing one target, each with its own options): README, "Catch-alls, pools
and scopes".
"""

from __future__ import annotations

import functools
import itertools
import os
import signal
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    FIXTURES,
    TENANT,
    failing,
    gone,
    last_json_line,
    pipe_holders,
    read_json,
    run_python,
    since,
    spec,
    state,
    statuses,
    supervisor_of,
    tenant_log,
    tenant_report,
    the_status,
    tree_pids,
    wait_for,
    worker_children,
)

import bgpool
from bgpool import WorkerSpec


def _reports(sentinel_dir: Path, name: str, n: int) -> list[dict[str, Any]]:
    return [
        wait_for(
            functools.partial(tenant_report, sentinel_dir, name, instance=i),
            what=f"{name}#{i} report",
        )
        for i in range(n)
    ]


def _all_ready(pool: Any, name: str, n: int) -> list[Any]:
    """Wait until ``name`` has ``n`` ready instances (``start()`` and ``ensure()`` only
    wait for the first); return its rows sorted by instance."""

    def ready() -> list[Any] | None:
        rows = sorted(statuses(pool, name), key=lambda s: s.instance)
        ok = len(rows) == n and all(state(s.state) == "ready" for s in rows)
        return rows if ok else None

    return wait_for(ready, what=f"{n} ready instances of {name}")


# ------------------------------------------------------------------- pools


def test_pool_of_three_runs_three_processes_with_their_own_index(
    make_pool: Any, sentinel_dir: Path
) -> None:
    log = sentinel_dir / "log"
    pool = make_pool(
        [
            spec(
                "p",
                "tenant",
                num=3,
                env={
                    "LOG": str(log),
                    "REPORT_DIR": str(sentinel_dir),
                    "REPORT_KEYS": "BGPOOL_WORKER",
                },
            )
        ]
    )
    reports = _reports(sentinel_dir, "p", 3)
    pids = [r["pid"] for r in reports]
    assert len(set(pids)) == 3
    for i, r in enumerate(reports):
        assert r["worker"] == {"name": "p", "scope": "", "instance": i}, r["worker"]
        assert r["env"] == {"BGPOOL_WORKER": "p"}
    assert sorted((pid, name, inst) for pid, name, _, inst, _ in tenant_log(log)) == sorted(
        (pids[i], "p", i) for i in range(3)
    )  # three processes started, once each

    rows = _all_ready(pool, "p", 3)
    assert [s.instance for s in rows] == [0, 1, 2]
    assert [s.pid for s in rows] == pids
    assert all(state(s.state) == "ready" and s.ever_ready for s in rows)
    assert all(s.scope == "" for s in rows)
    sup = supervisor_of(pids[0])
    assert sorted(p.pid for p in worker_children(sup.pid)) == sorted(pids)

    diag = pool.diagnostics("p")
    assert diag.name == "p"
    assert diag.target == TENANT
    assert state(diag.state) == "ready"
    assert sorted((i.instance, i.pid) for i in diag.instances) == [(i, pids[i]) for i in range(3)]
    assert all(i.name == "p" for i in diag.instances)


def test_each_pool_member_has_its_own_stop_pipe(make_pool: Any, sentinel_dir: Path) -> None:
    make_pool([spec("p", "tenant", num=3, env={"REPORT_DIR": str(sentinel_dir)})])
    reports = _reports(sentinel_dir, "p", 3)
    inodes = [r["stop_pipe_inode"] for r in reports]
    assert len(set(inodes)) == 3
    sup = supervisor_of(reports[0]["pid"])
    tree = tree_pids()
    for r in reports:
        assert r["stop_pipe_link"] == f"pipe:[{r['stop_pipe_inode']}]"
        holders = pipe_holders(r["stop_pipe_inode"], tree)
        assert sorted(holders) == sorted([r["pid"], sup.pid]), (
            f"stop pipe of instance {r['worker']['instance']} held by {holders}"
        )


def test_shutdown_drains_every_pool_member(make_pool: Any, sentinel_dir: Path) -> None:
    # Each member lingers 1 s after its EOF: had one inherited a sibling's write end,
    # that sibling would only see EOF once the holder exits, a second later.
    eof = sentinel_dir / "eof"
    pool = make_pool(
        [
            spec(
                "p",
                "tenant",
                num=3,
                env={"REPORT_DIR": str(sentinel_dir), "EOF_LOG": str(eof), "LINGER": "1.0"},
            )
        ],
        grace_period=30.0,
    )
    pids = {r["pid"] for r in _reports(sentinel_dir, "p", 3)}
    t0 = time.monotonic()
    pool.shutdown()
    assert since(t0) < 3.0  # grace_period=30: only the drain makes this fast
    entries = tenant_log(eof)
    assert sorted((pid, inst) for pid, _, _, inst, _ in entries) == sorted(
        (r["pid"], r["worker"]["instance"]) for r in _reports(sentinel_dir, "p", 3)
    )
    assert {pid for pid, *_ in entries} == pids
    assert max(ts for *_, ts in entries) - t0 < 0.5, [ts - t0 for *_, ts in entries]
    assert all(gone(p) for p in pids)


def test_restart_workers_replaces_every_pool_member_one_at_a_time(
    make_pool: Any, sentinel_dir: Path
) -> None:
    log, eof = sentinel_dir / "log", sentinel_dir / "eof"
    pool = make_pool(
        [spec("p", "tenant", num=3, env={"LOG": str(log), "EOF_LOG": str(eof), "LINGER": "1.0"})],
        restart_grace_period=30.0,
    )
    old = {s.instance: s.pid for s in _all_ready(pool, "p", 3)}
    assert sorted(old) == [0, 1, 2]
    t0 = time.monotonic()
    pool.restart_workers()
    assert since(t0) < 10.0  # restart_grace_period=30: only the drains make this fast
    eofs = tenant_log(eof)
    assert sorted((pid, inst) for pid, _, _, inst, _ in eofs) == sorted(
        (pid, inst) for inst, pid in old.items()
    )
    # Rolling: a member is drained only once the one before it was replaced,
    # which takes its LINGER second after its EOF.
    times = sorted(ts for *_, ts in eofs)
    assert all(b - a >= 0.9 for a, b in itertools.pairwise(times)), [t - t0 for t in times]
    wait_for(lambda: len(tenant_log(log)) == 6, what="three respawns")
    respawned = {inst: pid for pid, _, _, inst, _ in tenant_log(log)[3:]}
    assert sorted(respawned) == [0, 1, 2]  # each index respawned once
    assert not set(respawned.values()) & set(old.values())
    wait_for(
        lambda: (
            {s.instance: s.pid for s in statuses(pool, "p")} == respawned
            and all(state(s.state) == "ready" for s in statuses(pool, "p"))
        ),
        what="every member ready again",
    )
    assert all(gone(p) for p in old.values())


@pytest.mark.parametrize("ready_instance", [0, 2])
def test_first_ready_member_makes_the_pool_ready(
    make_pool: Any, sentinel_dir: Path, ready_instance: int
) -> None:
    hang = ",".join(str(i) for i in range(3) if i != ready_instance)
    t0 = time.monotonic()
    pool = make_pool(
        [spec("p", "tenant", num=3, env={"HANG_INSTANCES": hang})],
        ensure_timeout=3.0,
        grace_period=0.2,
    )
    assert since(t0) < 2.0  # start() returned on the first ready member
    t0 = time.monotonic()
    pool.ensure("p", timeout=2)
    assert since(t0) < 0.5
    rows = {s.instance: s for s in statuses(pool, "p")}
    assert sorted(rows) == [0, 1, 2]
    for i, s in rows.items():
        assert s.pid is not None
        if i == ready_instance:
            assert state(s.state) == "ready" and s.ever_ready is True, s
        else:
            assert state(s.state) == "starting" and s.ever_ready is False, s
    assert pool.diagnostics("p").ever_ready is True


def test_a_crashed_pool_member_restarts_alone_with_its_index(
    make_pool: Any, sentinel_dir: Path
) -> None:
    log = sentinel_dir / "log"
    pool = make_pool([spec("p", "tenant", num=3, env={"LOG": str(log)})])
    old = {s.instance: s.pid for s in _all_ready(pool, "p", 3)}
    os.kill(old[1], signal.SIGKILL)
    wait_for(lambda: len(tenant_log(log)) == 4, what="member 1 respawned")
    pid, name, _, inst, _ = tenant_log(log)[3]
    assert (name, inst) == ("p", 1)
    assert pid not in old.values()
    wait_for(
        lambda: {s.instance: s.pid for s in statuses(pool, "p")} == {**old, 1: pid},
        what="member 1's new pid in status",
    )
    rows = {s.instance: s for s in statuses(pool, "p")}
    assert rows[1].attempts == 2
    assert rows[0].attempts == rows[2].attempts == 1
    assert len(tenant_log(log)) == 4  # nobody else restarted


def test_client_in_another_process_sees_every_pool_member(make_pool: Any) -> None:
    pool = make_pool([spec("p", "tenant", num=3)])
    _all_ready(pool, "p", 3)
    code = textwrap.dedent(
        """
        import json, bgpool
        client = bgpool.connect()
        client.ensure("p", timeout=5)
        print(json.dumps({
            "status": [s.model_dump(mode="json") for s in client.status()],
            "diag": client.diagnostics("p").model_dump(mode="json"),
        }))
        """
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    out = last_json_line(proc.stdout)
    expected = sorted((s.instance, s.pid) for s in statuses(pool, "p"))
    assert len(expected) == 3
    assert sorted((s["instance"], s["pid"]) for s in out["status"] if s["name"] == "p") == expected
    assert sorted((i["instance"], i["pid"]) for i in out["diag"]["instances"]) == expected
    assert all(s["state"] == "ready" for s in out["status"])


# --------------------------------------------------------- multi-entrypoint


def test_shared_target_keeps_each_declarations_env_and_num(
    make_pool: Any, sentinel_dir: Path
) -> None:
    common = {"REPORT_DIR": str(sentinel_dir), "REPORT_KEYS": "ROLE,ONLY_A,ONLY_B"}
    pool = make_pool(
        [
            spec("a", "tenant", num=2, env={**common, "ROLE": "alpha", "ONLY_A": "1"}),
            spec("b", "tenant", env={**common, "ROLE": "beta", "ONLY_B": "2"}),
        ]
    )
    assert sorted(s.instance for s in statuses(pool, "a")) == [0, 1]
    assert state(the_status(pool, "b").state) == "stopped"  # lazy: its own num
    pool.ensure("b", timeout=5)
    a0, a1 = _reports(sentinel_dir, "a", 2)
    (b,) = _reports(sentinel_dir, "b", 1)
    for r in (a0, a1):
        assert r["env"] == {"ROLE": "alpha", "ONLY_A": "1", "ONLY_B": None}
        assert r["worker"]["name"] == "a"
    assert b["env"] == {"ROLE": "beta", "ONLY_A": None, "ONLY_B": "2"}
    assert b["worker"]["name"] == "b"
    assert len({a0["pid"], a1["pid"], b["pid"]}) == 3
    assert pool.diagnostics("a").target == pool.diagnostics("b").target == TENANT


def test_shared_script_target_keeps_each_declarations_args(
    make_pool: Any, sentinel_dir: Path
) -> None:
    script = str(FIXTURES / "script_worker.py")
    out_one, out_two = sentinel_dir / "one.json", sentinel_dir / "two.json"
    pool = make_pool(
        [
            WorkerSpec(name="one", target=script, args=[str(out_one), "first"]),
            WorkerSpec(name="two", target=script, args=[str(out_two), "second", "--x"]),
        ]
    )
    pool.ensure(["one", "two"], timeout=5)
    one = wait_for(lambda: read_json(out_one), what="one's report")
    two = wait_for(lambda: read_json(out_two), what="two's report")
    assert one["argv"][1:] == [str(out_one), "first"]
    assert two["argv"][1:] == [str(out_two), "second", "--x"]
    assert (one["worker"], two["worker"]) == ("one", "two")
    assert one["pid"] != two["pid"]


def test_shared_target_keeps_each_declarations_failure_policy(
    make_pool: Any, sentinel_dir: Path
) -> None:
    log = sentinel_dir / "log"
    fail = failing(sentinel_dir, "strict", "lenient", "patient")
    env = {"LOG": str(log), "FAIL_DIR": str(fail)}
    pool = make_pool(
        [
            spec("strict", "tenant", max_consecutive_failures=2, env=env),
            spec("lenient", "tenant", max_consecutive_failures=3, env=env),
            spec("patient", "tenant", max_consecutive_failures=-1, env=env),
        ]
    )

    def attempts(name: str) -> int:
        return sum(1 for _, n, *_ in tenant_log(log) if n == name)

    for name, cap in (("strict", 2), ("lenient", 3)):
        with pytest.raises(bgpool.WorkerAborted) as info:
            pool.ensure(name, timeout=10)
        assert str(info.value).startswith(
            f'background worker "{name}" failed to start: {cap} consecutive failures '
            f"(last exit status 1, target {TENANT}): RuntimeError: boom {name}"
        ), str(info.value)
        assert attempts(name) == cap
        assert state(pool.diagnostics(name).state) == "aborted"

    with pytest.raises(bgpool.EnsureTimeout) as timeout_info:
        pool.ensure("patient", timeout=1)
    assert str(timeout_info.value).startswith(
        'background worker "patient" did not become ready within 1s'
    )
    wait_for(lambda: attempts("patient") >= 4, timeout=5, what="patient keeps trying")
    diag = pool.diagnostics("patient")
    assert state(diag.state) != "aborted"
    assert diag.consecutive_failures >= 4
    assert attempts("strict") == 2 and attempts("lenient") == 3  # aborted ones stay down
