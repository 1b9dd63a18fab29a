"""Reaching the pool from other processes of the application: ``bgpool.connect()``
through ``BGPOOL_ADDRESS`` or an explicit address (README, "From other processes").

Clients run in fresh interpreters started with ``subprocess`` after ``Pool.start()``,
so they inherit ``BGPOOL_ADDRESS`` like any process the application starts.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    last_json_line,
    read_json,
    run_python,
    spec,
    starts,
    state,
    subprocess_env,
    the_status,
    wait_for,
)

import bgpool

CLIENT_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import bgpool

    client = bgpool.connect()
    out = {"address": os.environ.get("BGPOOL_ADDRESS")}
    client.ensure("lazy", timeout=10)
    out["status"] = [s.model_dump(mode="json") for s in client.status()]
    d = client.diagnostics("lazy")
    out["diagnostics"] = d.model_dump(mode="json")
    try:
        client.ensure("nope", timeout=5)
    except bgpool.WorkerNotDeclared as exc:
        out["undeclared"] = str(exc)
    try:
        client.ensure("nr", timeout=1)
    except bgpool.EnsureTimeout as exc:
        out["timeout"] = str(exc)
        out["timeout_diag_name"] = exc.diagnostics.name
    try:
        client.ensure("crash", timeout=10)
    except bgpool.WorkerAborted as exc:
        out["aborted"] = str(exc)
        out["aborted_error"] = exc.diagnostics.last_error.model_dump(mode="json")
    for bad in ("", ["lazy", "lazy"]):
        try:
            client.ensure(bad)
        except ValueError:
            out.setdefault("value_errors", 0)
            out["value_errors"] += 1
    try:
        client.ensure(42)
    except TypeError:
        out["type_error"] = True
    print(json.dumps(out))
    """
)


@pytest.fixture
def client_pool(make_pool: Any, sentinel_dir: Path) -> Any:
    return make_pool(
        [
            spec("eager", "idle", num=1),
            spec("lazy", "idle", env={"STARTS": str(sentinel_dir / "lazy.starts")}),
            spec("nr", "never_ready"),
            spec("crash", "crash_at_boot", max_consecutive_failures=2),
        ],
        grace_period=0.5,
    )


def test_client_in_another_process_uses_the_inherited_address(
    client_pool: Any, sentinel_dir: Path
) -> None:
    proc = run_python(CLIENT_SCRIPT)
    assert proc.returncode == 0, proc.stderr
    out = last_json_line(proc.stdout)
    assert out["address"] == client_pool.address

    # the client's ensure() started the lazy worker in the application's pool
    lazy = the_status(client_pool, "lazy")
    assert state(lazy.state) == "ready"
    assert [pid for pid, _ in starts(sentinel_dir / "lazy.starts")] == [lazy.pid]

    by_name = {s["name"]: s for s in out["status"]}
    assert set(by_name) == {"eager", "lazy", "nr", "crash"}
    assert by_name["lazy"]["state"] == "ready"
    assert by_name["lazy"]["pid"] == lazy.pid
    assert by_name["eager"]["pid"] == the_status(client_pool, "eager").pid

    diag = out["diagnostics"]
    assert diag["name"] == "lazy"
    assert diag["state"] == "ready"
    assert diag["target"] == "fixtures.workers:idle"
    assert [i["pid"] for i in diag["instances"]] == [lazy.pid]

    assert out["undeclared"] == 'no background worker configured for name "nope"'
    assert out["timeout"] == 'background worker "nr" did not call get_worker_handle() within 1s'
    assert out["timeout_diag_name"] == "nr"
    assert out["aborted"].startswith(
        'background worker "crash" failed to start: 2 consecutive failures '
        "(last exit status 1, target fixtures.workers:crash_at_boot): RuntimeError: boom"
    ), out["aborted"]
    assert out["aborted_error"]["type"] == "RuntimeError"
    assert out["aborted_error"]["message"] == "boom"
    assert out["value_errors"] == 2
    assert out["type_error"] is True


def test_client_with_explicit_address(make_pool: Any) -> None:
    pool = make_pool([spec("eager", "idle", num=1)])
    env = subprocess_env()
    env.pop("BGPOOL_ADDRESS", None)
    code = textwrap.dedent(
        f"""
        import json, os
        import bgpool
        assert "BGPOOL_ADDRESS" not in os.environ
        client = bgpool.connect({pool.address!r})
        client.ensure("eager", timeout=5)
        (st,) = client.status()
        print(json.dumps({{"state": st.model_dump(mode="json")["state"], "pid": st.pid}}))
        """
    )
    proc = run_python(code, env=env)
    assert proc.returncode == 0, proc.stderr
    out = last_json_line(proc.stdout)
    assert out == {"state": "ready", "pid": the_status(pool, "eager").pid}


def test_connect_without_address_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BGPOOL_ADDRESS", raising=False)
    with pytest.raises(bgpool.BgpoolError) as info:
        bgpool.connect()
    assert "BGPOOL_ADDRESS" in str(info.value)


def test_connect_without_address_raises_in_fresh_process() -> None:
    env = subprocess_env()
    env.pop("BGPOOL_ADDRESS", None)
    code = textwrap.dedent(
        """
        import json, bgpool
        try:
            bgpool.connect()
        except bgpool.BgpoolError as exc:
            print(json.dumps({"error": str(exc)}))
        """
    )
    proc = run_python(code, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "BGPOOL_ADDRESS" in last_json_line(proc.stdout)["error"]


def test_worker_reaches_the_pool_through_its_environment(
    make_pool: Any, sentinel_dir: Path
) -> None:
    result = sentinel_dir / "result.json"
    pool = make_pool(
        [
            spec("user", "client_user", num=1, env={"OTHER": "dep", "RESULT": str(result)}),
            spec("dep", "idle"),
        ]
    )
    out = wait_for(lambda: read_json(result), timeout=15, what="the worker's client result")
    assert out == {"ok": True}, out
    assert state(the_status(pool, "dep").state) == "ready"


def test_client_status_is_json_serialisable(client_pool: Any) -> None:
    code = textwrap.dedent(
        """
        import json, bgpool
        client = bgpool.connect()
        print(json.dumps([s.model_dump(mode="json") for s in client.status()]))
        """
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {r["name"] for r in rows} == {"eager", "lazy", "nr", "crash"}
    assert {r["name"]: r["state"] for r in rows}["lazy"] == "stopped"
