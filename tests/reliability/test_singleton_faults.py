"""Singletons under faults: three pools in three owner processes (each its own
"host": its own XDG_RUNTIME_DIR) share a private redis-server and a pool name;
a sampler checks every few milliseconds, throughout, that no two singleton
processes are alive at once. Each fault is one test: SIGKILL of the holder's
owner and of its supervisor, SIGSTOP of the coordinator that renews the
holder's lease and of the holder's whole pool but its worker, Redis stopped,
paused and restarted (with its data and without). Non-singleton workers must
not notice any of it. Leases last a second (`TTL`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import (
    ROOT,
    free_port,
    gone,
    kill_all,
    procs_with_address,
    read_json,
    subprocess_env,
    wait_for,
)
from redis_helpers import RedisServer, Sampler, holders, live_holders, short_dir

import bgpool

TTL = 1.0
RENEW = TTL / 3
TAKEOVER = TTL + RENEW  # SPEC: within lease_ttl plus one renewal period of the loss
SLACK = 1.5  # a loaded machine: forks, imports, scheduling
DEADLINE = TTL * 0.9  # a lease's safe deadline after its last renewal (bgpool/leases.py)


class Host:
    """An owner process with its pool, as one host of several."""

    def __init__(
        self, index: int, plan: dict[str, Any], directory: Path, prefix: tuple[str, ...] = ()
    ) -> None:
        self.index = index
        self.info_path = directory / f"host{index}.json"
        self.stderr_path = directory / f"host{index}.stderr"
        env = subprocess_env(XDG_RUNTIME_DIR=str(short_dir("bgh-")),
                             BGPOOL_TEST_POOL=f"host{index}")  # fmt: skip
        env.pop("BGPOOL_ADDRESS", None)
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "fixtures.singleton_owner",
                 json.dumps({**plan, "info": str(self.info_path)})],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=err,
            )  # fmt: skip
        self._info: dict[str, Any] | None = None

    def info(self) -> dict[str, Any]:
        if self._info is None:

            def ready() -> Any:
                assert self.proc.poll() is None, f"host{self.index} exited: {self.stderr()}"
                return read_json(self.info_path)

            self._info = wait_for(ready, timeout=30, what=f"host{self.index}'s pool")
        return self._info

    @property
    def supervisor(self) -> int:
        return int(self.info()["supervisor"])

    def coordinator(self) -> int:
        """The pid of the pool's coordinator process."""

        def find() -> int | None:
            for child in psutil.Process(self.supervisor).children():
                with contextlib.suppress(psutil.Error):
                    if " ".join(child.cmdline()).startswith("bgpool: coordinator"):
                        return child.pid
            return None

        return wait_for(find, timeout=10, what=f"host{self.index}'s coordinator")

    def status(self) -> dict[str, bgpool.WorkerStatus]:
        client = bgpool.connect(self.info()["address"])
        try:
            return {s.name: s for s in client.status()}
        finally:
            client.close()

    def holder(self) -> bgpool.LeaseHolder | None:
        """The holder of the "cron" lease, as this pool's diagnostics say."""
        client = bgpool.connect(self.info()["address"])
        try:
            return client.diagnostics("cron").holder
        finally:
            client.close()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-3000:]

    def close(self) -> None:
        """SIGKILL the owner; its supervisor drains and exits (the parent-death
        signal and the leak check take care of the rest), and whichever of the
        two outlived the other removed the pool's shared memory."""
        address = self._info["address"] if self._info else None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        if self._info is not None:
            with contextlib.suppress(AssertionError):
                wait_for(lambda: gone(self.supervisor), timeout=10, what="the supervisor")
        if address:
            kill_all(procs_with_address(address))
        if self._info is not None:
            table = self._info["table"]
            assert not list(Path("/dev/shm").glob(f"{table}*")), f"host{self.index} left {table}"


@pytest.fixture
def hosts(redis_server: RedisServer, sentinel_dir: Path) -> Iterator[Callable[..., list[Host]]]:
    """`hosts(target)` starts three owners whose pools share `redis_server` and
    the name "shared": a singleton "cron" running `target` and a plain worker;
    `hosts(target, urls, prefixes)` gives each its own coordinator URL and
    command prefix (a network namespace). Whatever a test SIGSTOPped
    (`frozen`) gets SIGCONT at teardown."""
    made: list[Host] = []
    frozen: list[int] = []

    def start(
        target: str = "fixtures.singleton_workers:holder",
        urls: list[str] | None = None,
        prefixes: list[tuple[str, ...]] | None = None,
    ) -> list[Host]:
        for i in range(3):
            plan = {
                "name": "shared", "coordinator": urls[i] if urls else redis_server.url,
                "lease_ttl": TTL, "grace_period": 1.0,
                "workers": [
                    {"name": "cron", "target": target, "num": 1, "singleton": True,
                     "env": {"BGPOOL_TEST_HOLDERS": str(sentinel_dir)}},
                    {"name": "plain", "target": "fixtures.singleton_workers:plain", "num": 1},
                ],
            }  # fmt: skip
            made.append(Host(i, plan, sentinel_dir.parent, prefixes[i] if prefixes else ()))
        for host in made:
            host.info()
        return made

    start.frozen = frozen  # type: ignore[attr-defined]
    try:
        yield start
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        for host in made:
            host.close()


def _freeze(hosts: Callable[..., list[Host]], *pids: int) -> None:
    for pid in pids:
        hosts.frozen.append(pid)  # type: ignore[attr-defined]
        os.kill(pid, signal.SIGSTOP)


def _thaw(*pids: int) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGCONT)


def _holder(sentinel_dir: Path, timeout: float, exclude: frozenset[int] = frozenset()) -> Any:
    def one() -> Any:
        alive = [r for r in live_holders(sentinel_dir) if r["pid"] not in exclude]
        return alive[0] if len(alive) == 1 else None

    return wait_for(one, timeout=timeout, what="one live singleton")


def _host_of(all_hosts: list[Host], record: dict[str, Any]) -> Host:
    return all_hosts[int(record["pool"].removeprefix("host"))]


def _plain_pids(all_hosts: list[Host], skip: Host | None = None) -> dict[int, int | None]:
    return {h.index: h.status()["plain"].pid for h in all_hosts if h is not skip}


def _wait_gone(pid: int, bound: float = DEADLINE + SLACK) -> float:
    """Wait until `pid` is dead; how long it took."""
    t0 = time.monotonic()
    wait_for(lambda: gone(pid), timeout=bound, what=f"process {pid} to die")
    return time.monotonic() - t0


def _all_standby(all_hosts: list[Host]) -> bool:
    return all(h.status()["cron"].state == "standby" for h in all_hosts)


def _takes_over(
    sentinel_dir: Path, old: dict[str, Any], bound: float
) -> tuple[dict[str, Any], float]:
    """The next holder once `old` is gone, and how long after now it started."""
    t0 = time.monotonic()
    new = _holder(sentinel_dir, bound, exclude=frozenset({old["pid"]}))
    assert new["token"] > old["token"], (old, new)
    return new, time.monotonic() - t0


def test_three_owners_contend_and_the_holders_owner_is_killed(
    hosts: Callable[..., list[Host]], sentinel_dir: Path
) -> None:
    """One singleton among three pools; SIGKILL of the holder's owner: its
    supervisor drains and releases, another pool takes over at once; never
    two alive, and the other pools' plain workers untouched."""
    all_hosts = hosts()
    with Sampler(sentinel_dir) as sampler:
        first = _holder(sentinel_dir, TAKEOVER + 5)
        victim = _host_of(all_hosts, first)
        plain = _plain_pids(all_hosts, skip=victim)
        victim.proc.kill()
        _, took = _takes_over(sentinel_dir, first, TAKEOVER + SLACK)
        assert took < TAKEOVER + SLACK
        assert _plain_pids(all_hosts, skip=victim) == plain
    sampler.check()


def test_the_holders_supervisor_is_killed(
    hosts: Callable[..., list[Host]], sentinel_dir: Path
) -> None:
    """SIGKILL of the holder's supervisor: its worker dies with it
    (parent-death signal), its lease runs out, another pool takes over within
    lease_ttl plus a renewal period."""
    all_hosts = hosts()
    with Sampler(sentinel_dir) as sampler:
        first = _holder(sentinel_dir, TAKEOVER + 5)
        victim = _host_of(all_hosts, first)
        plain = _plain_pids(all_hosts, skip=victim)
        os.kill(victim.supervisor, signal.SIGKILL)
        _, took = _takes_over(sentinel_dir, first, TAKEOVER + SLACK)
        assert took < TAKEOVER + SLACK
        assert _plain_pids(all_hosts, skip=victim) == plain
    sampler.check()


def test_a_frozen_coordinator_gets_its_worker_killed_before_the_lease_expires(
    hosts: Callable[..., list[Host]], sentinel_dir: Path, redis_server: RedisServer
) -> None:
    """SIGSTOP of the process that renews the holder's lease, whose worker
    ignores the drain and SIGTERM: the supervisor kills it by the lease's
    safe deadline, before another pool takes over. Resumed, the stale
    coordinator never renews: the new holder keeps the lease, and the old
    pool stays on standby. The plain workers run on."""
    all_hosts = hosts("fixtures.singleton_workers:stubborn")
    with Sampler(sentinel_dir) as sampler:
        first = _holder(sentinel_dir, TAKEOVER + 5)
        victim = _host_of(all_hosts, first)
        plain = _plain_pids(all_hosts)
        coordinator = victim.coordinator()
        _freeze(hosts, coordinator)
        assert _wait_gone(first["pid"]) < DEADLINE + 0.5
        new, _ = _takes_over(sentinel_dir, first, TAKEOVER + SLACK)
        _thaw(coordinator)
        hosts.frozen.remove(coordinator)  # type: ignore[attr-defined]
        wait_for(lambda: victim.status()["cron"].state == "standby", timeout=5, what="standby")
        with redis_server.client() as client:
            for _ in range(3):  # over several renewal periods, the lease stays the new one's
                holder = client.hgetall("bgpool:{shared}:holder::cron")
                assert int(holder[b"fence"]) == new["token"], holder
                time.sleep(RENEW)
        assert victim.status()["cron"].pid is None
        assert _plain_pids(all_hosts) == plain
    sampler.check()


def test_a_killed_coordinator_is_replaced(
    hosts: Callable[..., list[Host]], sentinel_dir: Path
) -> None:
    """SIGKILL of the holder's coordinator: its lease runs out on the
    supervisor's timers (the worker drained, then killed), and the lease is
    taken anew; the supervisor starts a new coordinator, and its pool contends
    again, never running a second singleton. The new holder is usually
    another pool, but the victim's new coordinator may win the expired lease
    (it takes at once, the others at their next renewal period): either way
    every pool, the victim included, sees the new holder, and only the
    holder's pool runs the worker."""
    all_hosts = hosts("fixtures.singleton_workers:stubborn")
    with Sampler(sentinel_dir) as sampler:
        first = _holder(sentinel_dir, TAKEOVER + 5)
        victim = _host_of(all_hosts, first)
        old = victim.coordinator()
        os.kill(old, signal.SIGKILL)
        _wait_gone(first["pid"])
        new, _ = _takes_over(sentinel_dir, first, TAKEOVER + SLACK)
        wait_for(lambda: victim.coordinator() != old, timeout=5, what="a new coordinator")
        for host in all_hosts:
            here = host is _host_of(all_hosts, new)

            def told(host: Host = host, here: bool = here) -> bool:
                holder, state = host.holder(), host.status()["cron"].state
                seen = holder is not None and (holder.lease_token, holder.here) == (
                    new["token"], here)  # fmt: skip
                return seen and state == ("ready" if here else "standby")

            wait_for(told, timeout=5, what=f"host{host.index} to see the new holder")
    sampler.check()


def test_a_frozen_pool_gets_its_worker_killed_by_its_own_timer(
    hosts: Callable[..., list[Host]], sentinel_dir: Path
) -> None:
    """SIGSTOP of the holder's supervisor and coordinator (all but the worker,
    which ignores the drain and SIGTERM): nothing of the pool runs to kill it,
    and yet it is dead by its lease's safe deadline (the kernel timer armed in
    the worker), before another pool takes over. Resumed, the pool goes to
    standby and never runs a second one."""
    all_hosts = hosts("fixtures.singleton_workers:stubborn")
    with Sampler(sentinel_dir) as sampler:
        first = _holder(sentinel_dir, TAKEOVER + 5)
        victim = _host_of(all_hosts, first)
        frozen = [victim.supervisor, victim.coordinator()]
        _freeze(hosts, *frozen)
        assert _wait_gone(first["pid"]) < DEADLINE + 0.5
        _takes_over(sentinel_dir, first, TAKEOVER + SLACK)
        _thaw(*frozen)
        wait_for(lambda: victim.status()["cron"].state == "standby", timeout=5, what="standby")
        time.sleep(TTL)  # a stale pool that would start it again has had time to
        assert len(live_holders(sentinel_dir)) == 1
    sampler.check()


@pytest.mark.parametrize("persist", [False, True], ids=["data-lost", "data-kept"])
def test_redis_stopped_and_restarted(
    hosts: Callable[..., list[Host]],
    sentinel_dir: Path,
    redis_server: RedisServer,
    persist: bool,
) -> None:
    """Redis stopped: the holder cannot renew and drains its worker (standby
    everywhere), the plain workers run on. Restarted (its data lost, or kept):
    one pool holds the singleton again, after a quarantine of one lease_ttl
    (a holder from before may have been running), under a larger fencing
    token; never two at once."""
    if persist:
        redis_server.stop()
        redis_server.start(persist=True)
    all_hosts = hosts()
    with Sampler(sentinel_dir) as sampler:
        first, plain = _holder(sentinel_dir, TAKEOVER + 5), _plain_pids(all_hosts)
        redis_server.stop()
        _wait_gone(first["pid"])
        wait_for(lambda: _all_standby(all_hosts), timeout=5, what="standby everywhere")
        redis_server.start(persist=persist)
        _, took = _takes_over(sentinel_dir, first, TAKEOVER + TTL + SLACK)
        assert took >= TTL * 0.9, "the first holder after a restart waits out the quarantine"
        assert _plain_pids(all_hosts) == plain
    sampler.check()
    assert len(holders(sentinel_dir)) == 2


def test_redis_paused(
    hosts: Callable[..., list[Host]], sentinel_dir: Path, redis_server: RedisServer
) -> None:
    """Redis paused (SIGSTOP) longer than a lease: the holder drains before
    the lease can expire; resumed, one pool takes over; never two."""
    all_hosts = hosts()
    with Sampler(sentinel_dir) as sampler:
        first, plain = _holder(sentinel_dir, TAKEOVER + 5), _plain_pids(all_hosts)
        redis_server.pause()
        _wait_gone(first["pid"])
        time.sleep(TTL)  # past the lease's expiry in Redis, by its clock
        redis_server.resume()
        _takes_over(sentinel_dir, first, TAKEOVER + SLACK)
        assert _plain_pids(all_hosts) == plain
    sampler.check()


class Network:
    """Three network namespaces, each joined to this one by a veth pair, as
    three hosts on a network with Redis: `cut(i)` takes host `i`'s link down
    (its packets are dropped: a partition, not a refused connection)."""

    def __init__(self) -> None:
        tag = os.getpid() % 100000
        self.subnet = 20 + os.getpid() % 200  # 10.SUBNET.i.0/24: unlikely to be another run's
        self.names = [f"bgp{tag}n{i}" for i in range(3)]
        self.links = [f"bgp{tag}v{i}" for i in range(3)]
        self.made: list[str] = []

    def address(self, i: int) -> str:
        """This side's address on host `i`'s link (where Redis listens)."""
        return f"10.{self.subnet}.{i}.1"

    def up(self) -> None:
        for i, (ns, link) in enumerate(zip(self.names, self.links, strict=True)):
            _ip("netns", "add", ns)
            self.made.append(ns)
            _ip("link", "add", link, "type", "veth", "peer", "name", f"{link}p")
            _ip("link", "set", f"{link}p", "netns", ns)
            _ip("addr", "add", f"{self.address(i)}/24", "dev", link)
            _ip("link", "set", link, "up")
            inside = [
                ("addr", "add", f"10.{self.subnet}.{i}.2/24", "dev", f"{link}p"),
                ("link", "set", f"{link}p", "up"),
                ("link", "set", "lo", "up"),
            ]
            for command in inside:
                _ip("netns", "exec", ns, "ip", *command)

    def cut(self, i: int, up: bool = False) -> None:
        _ip("link", "set", self.links[i], "up" if up else "down")

    def down(self) -> None:
        for link in self.links:
            subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _namespaces_work() -> bool:
    """Whether this machine lets the test make network namespaces (root, ip)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"bgpprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, check=False)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return made.returncode == 0


@pytest.fixture
def network() -> Iterator[Network]:
    if not _namespaces_work():
        pytest.skip("needs root and `ip netns` (network namespaces) to run pools as hosts")
    net = Network()
    try:
        net.up()
        yield net
    finally:
        net.down()


def test_three_hosts_in_network_namespaces_and_one_cut_off(
    hosts: Callable[..., list[Host]],
    sentinel_dir: Path,
    redis_server: RedisServer,
    network: Network,
) -> None:
    """Three pools in three network namespaces reach Redis over TCP; the
    holder's link goes down (a partition: its packets are dropped). It drains
    its singleton before the lease can expire, another host takes over, the
    plain workers run on; once the link is back, the cut-off host stays on
    standby. Never two alive."""
    port = free_port()
    redis_server.stop()
    redis_server.start(bind=tuple(network.address(i) for i in range(3)), port=port)
    urls = [f"redis://{network.address(i)}:{port}/0" for i in range(3)]
    all_hosts = hosts(urls=urls, prefixes=[("ip", "netns", "exec", ns) for ns in network.names])
    with Sampler(sentinel_dir) as sampler:
        first, plain = _holder(sentinel_dir, TAKEOVER + 5), _plain_pids(all_hosts)
        victim = _host_of(all_hosts, first)
        network.cut(victim.index)
        assert _wait_gone(first["pid"]) < DEADLINE + 0.5
        _takes_over(sentinel_dir, first, TAKEOVER + SLACK)
        network.cut(victim.index, up=True)
        wait_for(lambda: victim.status()["cron"].state == "standby", timeout=5, what="standby")
        assert _plain_pids(all_hosts) == plain
    sampler.check()


def test_a_frozen_supervisor_keeps_its_lease_and_restarts_its_worker(
    hosts: Callable[..., list[Host]], sentinel_dir: Path
) -> None:
    """SIGSTOP of the holder's supervisor alone: its coordinator goes on
    renewing, but nothing moves the worker's kernel timer on, so the worker is
    killed at the deadline it last had; no other pool runs one meanwhile.
    Resumed, the supervisor starts it again under the same lease (or, if a
    renewal failed meanwhile on a loaded machine, another pool does: what
    must not happen is a lease held with no worker running anywhere)."""
    all_hosts = hosts("fixtures.singleton_workers:stubborn")
    with Sampler(sentinel_dir) as sampler:
        first = _holder(sentinel_dir, TAKEOVER + 5)
        victim = _host_of(all_hosts, first)
        _freeze(hosts, victim.supervisor)
        assert _wait_gone(first["pid"]) < DEADLINE + 0.5
        _thaw(victim.supervisor)
        hosts.frozen.remove(victim.supervisor)  # type: ignore[attr-defined]
        again = _holder(sentinel_dir, TAKEOVER + SLACK, exclude=frozenset({first["pid"]}))
        if again["pool"] == first["pool"] and again["token"] != first["token"]:
            # Taken anew by the same pool: only right if its coordinator did
            # lose the lease meanwhile, never if the thawed supervisor gave up
            # one that had been renewed while it was stopped.
            assert _coordinator_lost(victim), victim.stderr()
    sampler.check()


def _coordinator_lost(host: Host) -> bool:
    """Whether the host's coordinator says a renewal failed (its warnings)."""
    stderr = host.stderr()
    return "coordinator unreachable" in stderr or "lost: it" in stderr
