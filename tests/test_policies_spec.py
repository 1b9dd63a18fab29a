"""SPEC's "Lifecycle policies", checked sentence by sentence from outside.

Written from SPEC (and the README's user docs for what SPEC leaves open), not from
the implementation: real pools (``make_pool``), real processes, the workers of
``fixtures/spec_policy_workers.py``, which log each event with its pid and
monotonic time to one file, so a test reads when a run started, became ready,
saw its stop, or got SIGTERM. Policies are short (0.3 to 1 s) and every bound
leaves room for a loaded 2-core machine.

Sections follow SPEC's bullets: declarations (defaults, validation of every new
field), ``boot_timeout``, ``heartbeat_timeout``, ``max_restarts`` within
``restart_window``, recycling (``max_memory``, ``max_lifetime`` with
``lifetime_jitter``), ``requires``.
"""

from __future__ import annotations

import math
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import gone, read_text, state, statuses, the_status, wait_for
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

import bgpool
import bgpool.metrics
from bgpool import PoolConfig, WorkerSpec

MakePool = Callable[..., Any]
FIXTURE = "fixtures.spec_policy_workers"
BOOT_TEXT = "did not call get_worker_handle() within {}s of starting"


# ---------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Event:
    """One line of a fixture worker's ``$LOG``."""

    kind: str
    name: str
    instance: int
    pid: int
    t: float
    wall: float


def events(log: Path, kind: str | None = None, name: str | None = None) -> list[Event]:
    out = []
    for line in (read_text(log) or "").splitlines():
        k, n, i, p, t, w = line.split()
        if (kind is None or k == kind) and (name is None or n == name):
            out.append(Event(k, n, int(i), int(p), float(t), float(w)))
    return out


def spawned_at(pool: Any, name: str, seen: dict[int, float]) -> None:
    """Note in ``seen`` when each run of ``name`` now running was spawned
    (``WorkerStatus.started_at``, wall clock), by pid: a worker's own first event
    comes later than its spawn, by a whole interpreter's start with ``spawn``."""
    for s in statuses(pool, name):
        if s.pid is not None and s.started_at is not None:
            seen.setdefault(s.pid, s.started_at.timestamp())


def kinds(log: Path) -> list[str]:
    """``"<event> <name>"`` for each line, in order."""
    return [f"{e.kind} {e.name}" for e in events(log)]


def worker(name: str, func: str, log: Path, env: dict[str, str] | None = None, **kw: Any) -> Any:
    return WorkerSpec(
        name=name, target=f"{FIXTURE}:{func}", env={"LOG": str(log), **(env or {})}, **kw
    )


def metric(pool: Any, sample: str, **labels: str) -> float | None:
    """A sample's value from ``bgpool.metrics.collector`` in a fresh registry."""
    registry = CollectorRegistry()
    bgpool.metrics.collector(pool, registry)
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            if s.name == sample and s.labels == labels:
                return float(s.value)
    return None


def states_of(pool: Any, name: str) -> list[str]:
    return [state(s.state) for s in statuses(pool, name)]


def wait_state(pool: Any, name: str, wanted: str, timeout: float = 10.0) -> None:
    wait_for(lambda: states_of(pool, name) == [wanted], timeout, f"{name} {wanted}")


def stated(pool: Any, name: str, wanted: str) -> bool:
    return wanted in states_of(pool, name)


def error_locs(**kwargs: Any) -> dict[tuple[Any, ...], str]:
    """``loc -> message`` of each error building one declaration (as a dict in a
    ``PoolConfig``) reports."""
    with pytest.raises(ValidationError) as info:
        PoolConfig.model_validate(
            {"workers": [{"name": "w", "target": f"{FIXTURE}:plain", **kwargs}]}
        )
    return {tuple(e["loc"]): e["msg"] for e in info.value.errors()}


# ------------------------------------------------------------------ declarations


def test_every_policy_is_off_by_default() -> None:
    s = WorkerSpec(name="w", target=f"{FIXTURE}:plain")
    assert s.boot_timeout is None
    assert s.heartbeat_timeout is None
    assert s.max_restarts is None
    assert s.restart_window == 60.0
    assert s.max_memory is None
    assert s.max_lifetime is None
    assert s.lifetime_jitter == 0.1
    assert s.requires == []


def test_every_policy_is_accepted_with_good_values() -> None:
    s = WorkerSpec(
        name="w",
        target=f"{FIXTURE}:plain",
        boot_timeout=0.5,
        heartbeat_timeout=2,
        max_restarts=0,
        restart_window=1.5,
        max_memory=64 * 1024 * 1024,
        max_lifetime=3600,
        lifetime_jitter=0.0,
    )
    assert (s.boot_timeout, s.heartbeat_timeout, s.max_restarts) == (0.5, 2.0, 0)
    assert (s.restart_window, s.max_memory, s.max_lifetime) == (1.5, 64 * 1024 * 1024, 3600.0)
    assert s.lifetime_jitter == 0.0


BAD_VALUES = [
    ("boot_timeout", 0),
    ("boot_timeout", -1.0),
    ("boot_timeout", math.nan),
    ("boot_timeout", math.inf),
    ("boot_timeout", "soon"),
    ("heartbeat_timeout", 0),
    ("heartbeat_timeout", -0.5),
    ("heartbeat_timeout", math.nan),
    ("heartbeat_timeout", [1]),
    ("max_restarts", -1),
    ("max_restarts", 1.5),
    ("max_restarts", "many"),
    ("restart_window", 0),
    ("restart_window", -60.0),
    ("restart_window", math.nan),
    ("restart_window", None),
    ("restart_window", "a minute"),
    ("max_memory", 0),
    ("max_memory", -1),
    ("max_memory", 1.5),
    ("max_memory", "1G"),
    ("max_lifetime", 0),
    ("max_lifetime", -1.0),
    ("max_lifetime", math.nan),
    ("max_lifetime", {}),
    ("lifetime_jitter", -0.1),
    ("lifetime_jitter", math.nan),
    ("lifetime_jitter", math.inf),
    ("lifetime_jitter", "some"),
    ("requires", "db"),
    ("requires", [1]),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_a_bad_value_is_refused_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as info:
        WorkerSpec(name="w", target=f"{FIXTURE}:plain", **{field: value})
    assert {e["loc"][0] for e in info.value.errors()} == {field}
    locs = error_locs(**{field: value})
    assert all(loc[:3] == ("workers", 0, field) for loc in locs), locs


def test_every_bad_policy_is_reported_at_once_with_its_path() -> None:
    fields = [
        "boot_timeout",
        "heartbeat_timeout",
        "max_restarts",
        "restart_window",
        "max_memory",
        "max_lifetime",
        "lifetime_jitter",
    ]
    locs = error_locs(**dict.fromkeys(fields, -1))
    assert {loc[2] for loc in locs} == set(fields), locs


# ------------------------------------------------------------------ boot_timeout


def boot_timing_out(log: Path, func: str = "never_ready", **kw: Any) -> Any:
    kw.setdefault("boot_timeout", 0.4)
    return worker("slow", func, log, **kw)


def test_boot_timeout_is_a_boot_failure_with_its_diagnostic(
    make_pool: MakePool, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    pool = make_pool([boot_timing_out(log, max_consecutive_failures=-1)])
    with pytest.raises(bgpool.EnsureTimeout) as info:
        pool.ensure("slow", timeout=1.5)
    text = BOOT_TEXT.format("0.4")
    assert text in str(info.value)
    assert "did not become ready within 1.5s" in str(info.value)
    assert info.value.diagnostics.last_error is not None
    assert text in info.value.diagnostics.last_error.message
    # at least two attempts: each stopped ~0.4 s after its start, a boot failure
    wait_for(lambda: len(events(log, "start")) >= 2, 5, "a second attempt")
    diag = pool.diagnostics("slow")
    assert diag.ever_ready is False
    assert diag.consecutive_failures >= 1
    assert diag.last_error is not None and text in diag.last_error.message
    first, second = events(log, "start")[:2]
    assert gone(first.pid)
    assert second.t - first.t >= 0.4 - 0.05


def test_boot_timeout_counts_from_the_spawn_and_sends_sigterm(
    make_pool: MakePool, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    pool = make_pool([boot_timing_out(log, "deaf_boot", max_consecutive_failures=1)])
    pool.start_workers("slow")
    spawns: dict[int, float] = {}

    def spawn_seen() -> bool:
        spawned_at(pool, "slow", spawns)
        return any(e.pid in spawns for e in events(log, "start"))

    wait_for(spawn_seen, 5, "the run's spawn time")
    with pytest.raises(bgpool.WorkerAborted):
        pool.ensure("slow", timeout=8)
    (start,) = events(log, "start")
    (child,) = events(log, "child")
    terms = events(log, "sigterm")
    # SIGTERM to the whole tree (the worker and its child), 0.4 s after the spawn
    assert {e.pid for e in terms} == {start.pid, child.pid}, terms
    since_spawn = [e.wall - spawns[start.pid] for e in terms]
    assert all(0.4 - 0.05 <= t <= 0.4 + 2.0 for t in since_spawn), since_spawn
    # both ignored it: SIGKILL ended them
    assert gone(start.pid)
    wait_for(lambda: gone(child.pid), 1, "the child killed")
    diag = pool.diagnostics("slow")
    assert diag.last_exit_status == -9
    assert diag.last_signal == "SIGKILL"


@pytest.mark.parametrize(("timeout", "shown"), [(0.3, "0.3"), (1.0, "1")])
def test_boot_timeout_diagnostic_is_in_worker_boot_failed(
    make_pool: MakePool, tmp_path: Path, timeout: float, shown: str
) -> None:
    """The timeout is shown as EnsureTimeout shows its deadline (``within 5s``)."""
    pool = make_pool([boot_timing_out(tmp_path / "log", boot_timeout=timeout)])
    with pytest.raises(bgpool.WorkerBootFailed) as info:
        pool.ensure("slow", timeout=8, fail_fast=True)
    assert not isinstance(info.value, bgpool.WorkerAborted)
    assert 'background worker "slow" failed to boot: attempt 1 failed' in str(info.value)
    assert BOOT_TEXT.format(shown) in str(info.value)
    assert info.value.diagnostics.name == "slow"


def test_boot_timeout_diagnostic_is_in_worker_aborted(make_pool: MakePool, tmp_path: Path) -> None:
    log = tmp_path / "log"
    pool = make_pool([boot_timing_out(log, boot_timeout=0.3, max_consecutive_failures=2)])
    with pytest.raises(bgpool.WorkerAborted) as info:
        pool.ensure("slow", timeout=8)
    assert 'background worker "slow" failed to start: 2 consecutive failures' in str(info.value)
    assert BOOT_TEXT.format("0.3") in str(info.value)
    assert len(events(log, "start")) == 2


def test_boot_timeout_diagnostic_is_in_startup_error(make_pool: MakePool, tmp_path: Path) -> None:
    log = tmp_path / "log"
    pool = make_pool(
        [boot_timing_out(log, num=1, boot_timeout=0.3, max_consecutive_failures=1)], start=False
    )
    with pytest.raises(bgpool.StartupError) as info:
        pool.start()
    assert '"slow"' in str(info.value)
    assert BOOT_TEXT.format("0.3") in str(info.value)
    assert info.value.diagnostics


def test_boot_timeout_still_stops_a_boot_that_a_shutdown_drains(
    make_pool: MakePool, tmp_path: Path
) -> None:
    """A run not ready within boot_timeout is stopped then, drain or not: it does
    not get the whole grace_period (5 s here) because a shutdown began first."""
    log = tmp_path / "log"
    pool = make_pool([boot_timing_out(log, boot_timeout=0.5)])
    pool.start_workers("slow")
    wait_for(lambda: events(log, "start"), 5, "the spawn")
    t0 = time.monotonic()
    pool.shutdown()
    assert time.monotonic() - t0 < 0.5 + 1.0 + 1.0


def test_boot_timeout_spares_a_worker_ready_in_time(make_pool: MakePool, tmp_path: Path) -> None:
    log = tmp_path / "log"
    pool = make_pool([boot_timing_out(log, "plain", boot_timeout=1.0, env={"BOOT_DELAY": "0.3"})])
    pool.ensure("slow", timeout=8)
    (start,) = events(log, "start")
    # well past its boot_timeout once ready: still the same run
    wait_for(lambda: age(start) > 1.6, 5, "1.6 s of life")
    assert events(log, "start") == [start]
    assert state(the_status(pool, "slow").state) == "ready"


def age(event: Event) -> float:
    """Seconds since ``event``."""
    return time.monotonic() - event.t


# -------------------------------------------------------------- heartbeat_timeout


def beating(log: Path, **env: str) -> Any:
    return worker("beat", "beating", log, env=env, heartbeat_timeout=0.5)


@pytest.mark.parametrize("deaf", ["", "1"], ids=["plain", "ignoring-sigterm"])
def test_a_worker_that_stops_heartbeating_is_hung_killed_and_restarted(
    make_pool: MakePool, tmp_path: Path, deaf: str
) -> None:
    log = tmp_path / "log"
    pool = make_pool([beating(log, HANG_RUNS="1", DEAF=deaf)], metrics_port=0)
    pool.ensure("beat")
    wait_for(lambda: len(events(log, "ready")) >= 2, 8, "the restart after the hang")
    (beat,) = events(log, "beat")
    first, second = events(log, "start")[:2]
    assert first.pid == beat.pid
    wait_for(lambda: gone(first.pid), 3, "the hung run killed")
    # hung once its heartbeat_timeout passed after its last heartbeat, not before
    assert second.t - beat.t >= 0.5 - 0.05
    if not deaf:
        assert second.t - beat.t < 0.5 + 1.5
    diag = pool.diagnostics("beat")
    assert diag.last_error is not None and diag.last_error.type == "Hung"
    assert diag.last_exit_status is not None and diag.last_exit_status < 0
    wait_state(pool, "beat", "ready")
    label = {"worker": "m#:beat"}
    assert metric(pool, "bgpool_worker_hangs_total", **label) == 1.0
    # killed outside a drain: an abnormal exit, as SPEC's Metrics counts crashes
    assert metric(pool, "bgpool_worker_crashes_total", **label) == 1.0
    restarts = metric(pool, "bgpool_worker_restarts_total", **label)
    assert restarts is not None and restarts >= 1
    scraped = http_metrics(pool.metrics_port)
    assert 'bgpool_worker_hangs_total{worker="m#:beat"} 1.0' in scraped


def http_metrics(port: int) -> str:
    """The text of ``/metrics`` on the pool's metrics port."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


@pytest.mark.parametrize("mode", ["heartbeat", "tick"])
def test_heartbeats_keep_a_worker_alive_and_boot_needs_none(
    make_pool: MakePool, tmp_path: Path, mode: str
) -> None:
    log = tmp_path / "log"
    # boots for longer than heartbeat_timeout: only readiness starts the clock
    pool = make_pool([beating(log, MODE=mode, BOOT_DELAY="0.8")])
    pool.ensure("beat")
    (start,) = events(log, "start")
    wait_for(lambda: age(start) > 0.8 + 1.5, 5, "three heartbeat timeouts")
    assert events(log, "start") == [start]
    diag = pool.diagnostics("beat")
    assert diag.last_error is None
    assert metric(pool, "bgpool_worker_hangs_total", worker="m#:beat") == 0.0


@pytest.mark.parametrize("policy", [0.5, None], ids=["heartbeat_timeout", "no-policy"])
def test_tick_is_true_until_a_drain_starts_then_false(
    make_pool: MakePool, tmp_path: Path, policy: float | None
) -> None:
    log = tmp_path / "log"
    pool = make_pool(
        [worker("ticker", "beating", log, env={"TICK": "0.2"}, heartbeat_timeout=policy)]
    )
    pool.ensure("ticker")
    wait_for(lambda: len(events(log, "tick")) >= 3, 5, "three ticks")
    assert not events(log, "tick-false")
    asked = time.monotonic()
    pool.stop("ticker")
    wait_for(lambda: events(log, "tick-false"), 3, "tick() returning False")
    (false,) = events(log, "tick-false")
    (start,) = events(log, "start")
    assert all(e.t < false.t for e in events(log, "tick"))
    assert false.t - asked < 1.0
    wait_state(pool, "ticker", "stopped", timeout=3)
    assert pool.diagnostics("ticker").last_error is None
    assert start.pid == false.pid


# ---------------------------------------------------- max_restarts, restart_window


def crasher(log: Path, **kw: Any) -> Any:
    env = {k: str(v) for k, v in kw.pop("env").items()}
    return worker("crash", "crashing", log, env=env, **kw)


@pytest.mark.parametrize(
    ("most", "crashes", "aborted"), [(2, 2, False), (2, 3, True), (0, 1, True)]
)
def test_more_crashes_than_max_restarts_within_the_window_abort(
    make_pool: MakePool, tmp_path: Path, most: int, crashes: int, aborted: bool
) -> None:
    log = tmp_path / "log"
    pool = make_pool(
        [crasher(log, max_restarts=most, restart_window=30, env={"CRASHES": crashes, "RUN": 0.05})]
    )
    pool.ensure("crash")
    if aborted:
        wait_state(pool, "crash", "aborted")
        assert len(events(log, "start")) == most + 1
        with pytest.raises(bgpool.WorkerAborted) as info:
            pool.ensure("crash", timeout=5)
        assert 'background worker "crash"' in str(info.value)
        assert info.value.diagnostics.name == "crash"
        assert metric(pool, "bgpool_worker_crashes_total", worker="m#:crash") == most + 1
    else:
        wait_for(lambda: len(events(log, "ready")) == 3, 8, "the run after two crashes")
        wait_state(pool, "crash", "ready")
        pool.ensure("crash", timeout=5)
        assert len(events(log, "start")) == 3


@pytest.mark.parametrize(("window", "aborted"), [(0.4, False), (30.0, True)])
def test_crashes_spread_wider_than_the_window_do_not_abort(
    make_pool: MakePool, tmp_path: Path, window: float, aborted: bool
) -> None:
    log = tmp_path / "log"
    # each run lives 0.6 s, longer than a 0.4 s window: never two crashes in one
    pool = make_pool(
        [crasher(log, max_restarts=1, restart_window=window, env={"CRASHES": 3, "RUN": 0.6})]
    )
    pool.ensure("crash")
    if aborted:
        wait_state(pool, "crash", "aborted")
        assert len(events(log, "start")) == 2
    else:
        wait_for(lambda: len(events(log, "ready")) == 4, 10, "the run after three crashes")
        wait_state(pool, "crash", "ready")
        assert not stated(pool, "crash", "aborted")
        pool.ensure("crash", timeout=5)


@pytest.mark.parametrize(
    "env",
    [{"BOOT_FAILS": 3}, {"CRASHES": 3, "EXIT": "clean"}],
    ids=["boot-failures", "clean-exits"],
)
def test_only_crashes_after_readiness_count(
    make_pool: MakePool, tmp_path: Path, env: dict[str, Any]
) -> None:
    log = tmp_path / "log"
    pool = make_pool([crasher(log, max_restarts=1, restart_window=30, env=env)])
    pool.ensure("crash", timeout=8)
    wait_for(lambda: len(events(log, "start")) == 4, 8, "the fourth attempt")
    wait_state(pool, "crash", "ready")
    pool.ensure("crash", timeout=5)


# ------------------------------------------------------------------- recycling


def hogging(log: Path, where: str) -> Any:
    return worker(
        "hog",
        "hog",
        log,
        env={"HOG_MIB": "200", "HOG_IN": where},
        max_memory=120 * 1024 * 1024,
    )


@pytest.mark.parametrize("where", ["self", "child"])
def test_a_worker_past_max_memory_is_recycled_gracefully(
    make_pool: MakePool, tmp_path: Path, where: str
) -> None:
    log = tmp_path / "log"
    pool = make_pool([hogging(log, where)], metrics_port=0)
    pool.ensure("hog")
    wait_for(lambda: events(log, "hogging"), 5, "the allocation")
    # sampled at least every 5 s
    wait_for(lambda: len(events(log, "ready")) >= 2, 12, "the recycle")
    first = events(log, "start")[0]
    stops = events(log, "stop")
    assert stops and stops[0].pid == first.pid, "the worker did not see its stop on the handle"
    wait_for(lambda: gone(first.pid), 3, "the recycled run exited")
    diag = pool.diagnostics("hog")
    assert diag.last_recycle_reason == "memory"
    assert diag.last_error is None
    label = {"worker": "m#:hog"}
    assert metric(pool, "bgpool_worker_recycles_total", reason="memory", **label) == 1.0
    assert metric(pool, "bgpool_worker_recycles_total", reason="lifetime", **label) == 0.0
    assert metric(pool, "bgpool_worker_crashes_total", **label) == 0.0
    scraped = http_metrics(pool.metrics_port)
    assert 'bgpool_worker_recycles_total{reason="memory",worker="m#:hog"} 1.0' in scraped
    # the new run allocates nothing: it stays
    second = events(log, "start")[1]
    wait_state(pool, "hog", "ready")
    assert alive_run(second)


def alive_run(event: Event) -> bool:
    return not gone(event.pid)


@pytest.mark.parametrize("jitter", [0.0, 1.0])
def test_each_run_lives_max_lifetime_times_one_plus_jitter(
    make_pool: MakePool, tmp_path: Path, jitter: float
) -> None:
    log = tmp_path / "log"
    life = 0.4
    pool = make_pool(
        [
            worker(
                "life",
                "plain",
                log,
                env={"STOP_DELAY": "0.2"},
                max_lifetime=life,
                lifetime_jitter=jitter,
            )
        ]
    )
    pool.ensure("life")
    spawns: dict[int, float] = {}

    def recycled_four_times() -> bool:
        spawned_at(pool, "life", spawns)
        return len(events(log, "exit")) >= 4

    wait_for(recycled_four_times, 12, "four recycles")
    # graceful: each recycled run saw its stop and ended by itself, after STOP_DELAY
    assert [e.pid for e in events(log, "exit")][:4] == [e.pid for e in events(log, "stop")][:4]
    lives = [stop.wall - spawns[stop.pid] for stop in events(log, "stop")[:4]]
    # from its spawn to the drain it saw: in [max_lifetime, max_lifetime * (1 + jitter)]
    assert all(life - 0.05 <= lived <= life * (1 + jitter) + 0.6 for lived in lives), lives
    if jitter:
        # u uniform in [0, 1]: all four below 0.15 has a chance of 0.15**4 (0.05%)
        assert max(lives) > life * 1.15, f"no jitter seen: {lives}"
    diag = pool.diagnostics("life")
    assert diag.last_recycle_reason == "lifetime"
    assert diag.last_error is None
    recycled = metric(pool, "bgpool_worker_recycles_total", reason="lifetime", worker="m#:life")
    assert recycled is not None and recycled >= 4


@dataclass
class Readiness:
    """What ``status()`` showed of a pool, sampled as fast as the test could."""

    samples: int = 0
    least_ready: int = 99
    most_not_ready: int = 0

    def sample(self, pool: Any, name: str) -> None:
        found = states_of(pool, name)
        ready = found.count("ready")
        self.samples += 1
        self.least_ready = min(self.least_ready, ready)
        self.most_not_ready = max(self.most_not_ready, len(found) - ready)


def test_a_pool_recycles_one_instance_at_a_time_never_without_a_ready_one(
    make_pool: MakePool, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    pool = make_pool([worker("trio", "plain", log, num=3, max_lifetime=1.0, lifetime_jitter=0.5)])
    wait_for(lambda: states_of(pool, "trio") == ["ready"] * 3, 8, "three ready instances")
    seen = Readiness()

    def each_replaced() -> bool:
        seen.sample(pool, "trio")
        runs = [{e.pid for e in events(log, "start") if e.instance == i} for i in range(3)]
        return all(len(r) >= 2 for r in runs) and len(events(log, "up")) >= 6

    wait_for(each_replaced, 10, "every instance recycled once")
    for _ in range(20):
        seen.sample(pool, "trio")
    assert seen.least_ready >= 1, seen
    assert seen.most_not_ready <= 1, f"not rolling: {seen}"
    first_stops: dict[int, float] = {}
    for e in events(log, "stop"):
        first_stops.setdefault(e.instance, e.t)
    times = sorted(first_stops.values())
    assert len(times) == 3
    assert times[1] > times[0] and times[2] > times[1]
    assert pool.diagnostics("trio").last_recycle_reason == "lifetime"


# -------------------------------------------------------------------- requires


def needing(name: str, log: Path, *requires: str, **kw: Any) -> Any:
    env = {"BOOT_DELAY": "0.3", **kw.pop("env", {})}
    return worker(name, "plain", log, env=env, requires=list(requires), **kw)


def assert_order(log: Path, *lines: str) -> None:
    seen = kinds(log)
    for line in lines:
        assert line in seen, f"{line!r} not in {seen}"
    at = [seen.index(line) for line in lines]
    assert at == sorted(at), f"{lines} not in this order in {seen}"


def test_start_starts_what_is_required_first(make_pool: MakePool, tmp_path: Path) -> None:
    log = tmp_path / "log"
    make_pool(
        [
            needing("app", log, "cache", num=1),
            needing("cache", log, "db"),
            needing("db", log),
        ]
    )
    assert_order(log, "up db", "start cache", "up cache", "start app", "up app")


def test_ensure_of_a_dependant_starts_its_requirement_first(
    make_pool: MakePool, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    pool = make_pool([needing("mailer", log, "db"), needing("db", log)])
    assert kinds(log) == []
    pool.ensure("mailer")
    assert_order(log, "start db", "up db", "start mailer", "up mailer")
    assert states_of(pool, "db") == ["ready"]


def test_reload_starts_a_new_dependants_requirement_first(
    make_pool: MakePool, tmp_path: Path, start_method: str | None
) -> None:
    log = tmp_path / "log"
    settings: dict[str, Any] = {"grace_period": 5.0, "ensure_timeout": 10.0}
    if start_method is not None:
        settings["start_method"] = start_method
    pool = make_pool(config=PoolConfig(workers=[needing("db", log)], **settings))
    pool.reload(
        PoolConfig(workers=[needing("db", log), needing("api", log, "db", num=1)], **settings)
    )
    assert_order(log, "start db", "up db", "start api")
    wait_state(pool, "api", "ready")


def test_shutdown_drains_dependants_before_what_they_require(
    make_pool: MakePool, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    pool = make_pool(
        [
            needing("db", log, num=1),
            needing("app", log, "db", num=1, env={"BOOT_DELAY": "0", "STOP_DELAY": "0.3"}),
        ]
    )
    pool.shutdown()
    assert_order(log, "stop app", "exit app", "stop db", "exit db")


@pytest.mark.parametrize(
    ("workers", "loc", "cycle"),
    [
        (
            [("a", ["b"]), ("b", ["c"]), ("c", ["a"])],
            ("workers", 0, "requires"),
            "a -> b -> c -> a",
        ),
        ([("x", []), ("b", ["c"]), ("c", ["b"])], ("workers", 1, "requires"), "b -> c -> b"),
    ],
    ids=["three", "two-after-another"],
)
def test_a_cycle_is_a_declaration_error_naming_it_in_order(
    workers: list[tuple[str, list[str]]], loc: tuple[Any, ...], cycle: str
) -> None:
    with pytest.raises(ValidationError) as info:
        PoolConfig.model_validate(
            {
                "workers": [
                    {"name": n, "target": f"{FIXTURE}:plain", "requires": r} for n, r in workers
                ]
            }
        )
    found = {tuple(e["loc"]): e["msg"] for e in info.value.errors()}
    assert loc in found, found
    assert cycle in found[loc]


def test_an_unknown_requirement_is_a_declaration_error_naming_it() -> None:
    other = bgpool.next_scope("other")
    with pytest.raises(ValidationError) as info:
        PoolConfig(
            workers=[
                WorkerSpec(name="db", target=f"{FIXTURE}:plain"),
                WorkerSpec(name="app", target=f"{FIXTURE}:plain", requires=["dbb"]),
                WorkerSpec(name="job", target=f"{FIXTURE}:plain", requires=["db"], scope=other),
            ]
        )
    found = {tuple(e["loc"]): e["msg"] for e in info.value.errors()}
    assert ("workers", 1, "requires") in found, found
    assert "dbb" in found[("workers", 1, "requires")]
    # a name of another scope is unknown: requirements are in the same scope
    assert ("workers", 2, "requires") in found, found
