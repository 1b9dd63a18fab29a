"""Singletons across hosts (`WorkerSpec.singleton`, `PoolConfig.coordinator`):
the declarations, one holder among pools that share a Redis and a pool name,
standby and its holder in status and diagnostics, `ensure()` of a singleton
held elsewhere, fencing tokens, takeover, metrics. Each test runs its own
redis-server; pools of one name run side by side in this process, each with
its own XDG_RUNTIME_DIR, as on several hosts. The faults (SIGKILL, SIGSTOP,
Redis down) are in tests/reliability/test_singleton_faults.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import run_python, wait_for
from pydantic import ValidationError
from redis_helpers import RedisServer, holders, live_holders, short_dir, wait_single_holder

import bgpool
from bgpool.cli.display import format_diagnostics

TTL = 1.0
"""Leases in these tests: a second (renewed every third of it)."""

TAKEOVER = TTL + TTL / 3
"""SPEC: another pool takes over within lease_ttl plus a renewal period."""

SLACK = 1.5
"""Seconds allowed beyond a bound for a loaded machine (forks, imports)."""

HOLDER = "fixtures.singleton_workers:holder"


def _config(redis_server: RedisServer, sentinel_dir: Path, **kwargs: Any) -> bgpool.PoolConfig:
    """A pool named "shared" with one eager singleton and one plain worker."""
    num = kwargs.pop("num", 1)
    env = {"BGPOOL_TEST_HOLDERS": str(sentinel_dir)}
    return bgpool.PoolConfig(
        name="shared",
        coordinator=redis_server.url,
        lease_ttl=kwargs.pop("lease_ttl", TTL),
        grace_period=2.0,
        ensure_timeout=10.0,
        workers=[
            bgpool.WorkerSpec(name="cron", target=HOLDER, num=num, singleton=True, env=env),
            bgpool.WorkerSpec(name="plain", target="fixtures.singleton_workers:plain", num=1),
        ],
        **kwargs,
    )


HostPool = Callable[..., bgpool.Pool]


@pytest.fixture
def host_pool(
    redis_server: RedisServer,
    make_pool: Callable[..., bgpool.Pool],
    monkeypatch: pytest.MonkeyPatch,
    sentinel_dir: Path,
) -> HostPool:
    """`host_pool(num=1)` starts a pool of `_config()` on `redis_server` as if on
    a host of its own: its named pool's directory in a private
    XDG_RUNTIME_DIR, so several pools of one name run side by side."""

    def start(num: int = 1, lease_ttl: float = TTL) -> bgpool.Pool:
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(short_dir("bgx-")))
        config = _config(redis_server, sentinel_dir, num=num, lease_ttl=lease_ttl)
        return make_pool(config=config)

    return start


def _holder_and_standby(host_pool: HostPool) -> tuple[bgpool.Pool, bgpool.Pool]:
    """A pool that holds the singleton, then one on standby."""
    a = host_pool()
    a.ensure("cron", timeout=TAKEOVER + 5)
    b = host_pool()
    b.ensure("cron", timeout=5)
    return a, b


def _singleton(pool: bgpool.Pool) -> bgpool.WorkerStatus:
    (status,) = [s for s in pool.status() if s.name == "cron"]
    return status


# -- declarations ---------------------------------------------------------------------


def test_declaration_errors_name_each_field(tmp_path: Path) -> None:
    """A singleton needs a coordinator, a coordinator needs a pool name, a
    singleton is one named instance, the URL must be Redis's, lease_ttl has a
    floor: every mistake at once, each at its field."""
    target = "fixtures.singleton_workers:holder"
    with pytest.raises(ValidationError) as caught:
        bgpool.PoolConfig(
            workers=[bgpool.WorkerSpec(name="a", target=target, singleton=True)],
            lease_ttl=0.1,
        )
    where = {tuple(e["loc"]): e["msg"] for e in caught.value.errors()}
    assert "needs PoolConfig.coordinator" in where[("workers", 0, "singleton")]
    assert "lease_ttl" in {e["loc"][0] for e in caught.value.errors()}
    with pytest.raises(ValidationError) as caught:
        bgpool.PoolConfig(workers=[], coordinator="redis://localhost:6379/0")
    assert "needs a name" in caught.value.errors()[0]["msg"]
    assert caught.value.errors()[0]["loc"] == ("name",)
    with pytest.raises(ValidationError, match="Redis URL"):
        bgpool.PoolConfig(workers=[], name="p", coordinator="http://localhost")
    for bad in ({"name": None}, {"num": 2}):
        with pytest.raises(ValidationError, match="one named instance"):
            bgpool.WorkerSpec(target=target, singleton=True, **({"name": "a"} | bad))


def test_a_coordinator_without_the_redis_client_says_what_to_install() -> None:
    """Without redis-py (hidden from a fresh interpreter), a config with a
    coordinator is a declaration error naming the extra to install."""
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "import bgpool, pydantic\n"
        "try:\n"
        "    bgpool.PoolConfig(workers=[], name='p', coordinator='redis://localhost')\n"
        "except pydantic.ValidationError as exc:\n"
        "    print(exc.errors()[0]['loc'], exc.errors()[0]['msg'])\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "('coordinator',)" in result.stdout
    assert "pip install 'bgpool[redis]'" in result.stdout


# -- one holder ---------------------------------------------------------------------


def test_three_pools_run_the_singleton_once_and_name_its_holder(
    host_pool: HostPool, sentinel_dir: Path
) -> None:
    """Of three pools sharing the coordinator and the name, one runs the
    singleton; the others show it on standby with the holder's host, pid and
    since when, and their ensure() returns (it is ready somewhere); every pool
    runs its plain worker."""
    pools = [host_pool() for _ in range(3)]
    for pool in pools:
        pool.ensure("cron", timeout=TAKEOVER + 5)
    holder = wait_single_holder(sentinel_dir, timeout=5)
    running = [p for p in pools if _singleton(p).pid is not None]
    assert len(running) == 1 and _singleton(running[0]).pid == holder["pid"]
    assert _singleton(running[0]).state == "ready"
    supervisor = running[0]._process
    assert supervisor is not None
    for pool in pools:
        assert next(s for s in pool.status() if s.name == "plain").state == "ready"
        if pool is running[0]:
            continue
        assert _singleton(pool).state == "standby"
        diagnostics = pool.diagnostics("cron")
        assert diagnostics.state == "standby" and diagnostics.singleton
        assert diagnostics.holder is not None
        assert diagnostics.holder.pid == supervisor.pid and not diagnostics.holder.here
        assert diagnostics.holder.ready and diagnostics.holder.lease_token == holder["token"]
        assert abs(diagnostics.holder.since.timestamp() - time.time()) < 60
        shown = format_diagnostics(diagnostics)
        assert "standby" in shown and f"pid {supervisor.pid}" in shown
    assert len(holders(sentinel_dir)) == 1


def test_the_worker_gets_its_fencing_token(
    host_pool: HostPool, sentinel_dir: Path, redis_server: RedisServer
) -> None:
    """current_worker().lease_token and BGPOOL_LEASE_TOKEN carry the token
    the coordinator handed out, as the holder's diagnostics do."""
    pool = host_pool()
    pool.ensure("cron", timeout=TAKEOVER + 5)
    record = wait_single_holder(sentinel_dir, timeout=5)
    assert isinstance(record["token"], int) and record["env_token"] == str(record["token"])
    holder = pool.diagnostics("cron").holder
    assert holder is not None and holder.here and holder.lease_token == record["token"]
    with redis_server.client() as client:
        assert int(client.get("bgpool:{shared}:fence::cron") or 0) == record["token"]


def test_takeover_after_the_holder_shuts_down_with_a_larger_token(
    host_pool: HostPool, sentinel_dir: Path, redis_server: RedisServer
) -> None:
    """A holder that shuts down releases its lease once its worker has exited
    (the lease is gone when shutdown() returns); another pool takes over at
    once, sooner than the lease could have expired, under a larger fencing
    token, each time. Leases of 3 s here: on a loaded machine a 1 s lease may
    be lost to a slow renewal just before the shutdown, and then expires."""
    ttl = 3.0
    pools = [host_pool(lease_ttl=ttl) for _ in range(3)]
    for _ in range(2):
        first = wait_single_holder(sentinel_dir, timeout=ttl + 5)
        pid = first["pid"]  # noted by the worker, maybe before its pool's status has it

        def reporting(pid: int = pid) -> bgpool.Pool | None:
            return next((p for p in pools if _singleton(p).pid == pid), None)

        holder_pool = wait_for(reporting, what="the holder's pool to report its worker")
        t0 = time.monotonic()
        holder_pool.shutdown()
        pools.remove(holder_pool)
        with redis_server.client() as client:  # released, not left to expire
            assert (
                client.hget("bgpool:{shared}:holder::cron", "fence") != str(first["token"]).encode()
            )
        second = wait_single_holder(sentinel_dir, timeout=ttl + SLACK,
                                    exclude=frozenset({first["pid"]}))  # fmt: skip
        assert time.monotonic() - t0 < ttl  # a period to notice (ttl/3), a fork: not an expiry
        assert second["token"] > first["token"]
    assert len(live_holders(sentinel_dir)) == 1


def test_ensure_of_a_lazy_singleton_held_elsewhere_returns_once_ready_there(
    host_pool: HostPool, sentinel_dir: Path
) -> None:
    """A lazy singleton ensured on one pool starts there; ensure() on another
    returns without starting it (standby), and stop() there lets it go."""
    a, b = host_pool(num=0), host_pool(num=0)
    assert _singleton(a).state == _singleton(b).state == "stopped"
    a.ensure("cron", timeout=TAKEOVER + 5)
    b.ensure("cron", timeout=5)
    assert _singleton(a).state == "ready" and _singleton(b).state == "standby"
    b.stop("cron")
    assert _singleton(b).state == "stopped"
    assert len(holders(sentinel_dir)) == 1


def test_metrics_count_acquisitions_and_show_the_holder(
    host_pool: HostPool, sentinel_dir: Path
) -> None:
    """bgpool_lease_acquisitions_total, bgpool_lease_held and
    bgpool_lease_holder_info on the holder and on a standby pool."""
    from prometheus_client import CollectorRegistry, generate_latest

    a, b = _holder_and_standby(host_pool)
    assert a._process is not None
    for pool, held in ((a, 1.0), (b, 0.0)):
        registry = CollectorRegistry()
        bgpool.metrics.collector(pool, registry)
        text = generate_latest(registry).decode()
        assert f'bgpool_lease_held{{worker="m#:cron"}} {held}' in text, text
        acquisitions = 'bgpool_lease_acquisitions_total{worker="m#:cron"}'
        assert f"{acquisitions} {held}" in text
        assert 'bgpool_lease_losses_total{worker="m#:cron"} 0.0' in text
        assert f'pid="{a._process.pid}"' in text and "bgpool_lease_holder_info{" in text
        assert "m#:plain" not in text.split("bgpool_lease_")[-1]


def test_scale_refuses_a_second_instance(host_pool: HostPool, sentinel_dir: Path) -> None:
    pool = host_pool()
    with pytest.raises(ValueError, match="a singleton runs one instance"):
        pool.scale("cron", 2)


def test_status_command_shows_standby_and_the_holder(
    host_pool: HostPool, sentinel_dir: Path
) -> None:
    """`bgpool status` on a standby pool: the singleton's row says standby, a
    line names its holder, and the exit status is 0 (it runs elsewhere)."""
    a, b = _holder_and_standby(host_pool)
    assert a._process is not None
    result = run_python(
        "import sys; from bgpool.cli.main import main; sys.argv = ['bgpool', 'status', "
        f"'--address', {b.address!r}]; main()"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "standby" in result.stdout
    assert f"cron: standby, held by {a.diagnostics('cron').holder.host}" in result.stdout  # type: ignore[union-attr]
    assert f"pid {a._process.pid}" in result.stdout
    as_json = run_python(
        "import sys; from bgpool.cli.main import main; sys.argv = ['bgpool', 'status', "
        f"'--json', '--address', {b.address!r}]; main()"
    )
    assert any(s["state"] == "standby" for s in json.loads(as_json.stdout))
    assert len(holders(sentinel_dir)) == 1
