"""Prometheus metrics and health endpoints: the families and labels read from the
readiness table, ``/metrics`` (text, OpenMetrics, gzip), ``/healthz`` and ``/readyz``.

Everything is observed from outside: ``/metrics`` is fetched over real HTTP on
127.0.0.1 and parsed with prometheus-client's own parsers; the custom collector
is exercised through the application's own ``CollectorRegistry``, in this process and
in another one that only has ``bgpool.connect()``.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import threading
import urllib.error
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import http_fetch, http_get, run_python, spec, statuses, supervisor_of, wait_for
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

import bgpool
import bgpool.metrics

LABEL_RE = re.compile(r"m#([^:]*):(.+)")

FAMILIES = {
    "bgpool_total_workers": "gauge",
    "bgpool_ready_workers": "gauge",
    "bgpool_worker_crashes": "counter",
    "bgpool_worker_restarts": "counter",
    "bgpool_worker_hangs": "counter",
    "bgpool_worker_recycles": "counter",
    "bgpool_worker_boot_seconds": "histogram",
}


# ---------------------------------------------------------------------- helpers


def refused(port: int) -> bool:
    """True when nothing accepts connections on 127.0.0.1:``port`` any more."""
    try:
        http_get(port, "/healthz")
    except urllib.error.URLError as exc:
        return isinstance(exc.reason, ConnectionRefusedError)
    except ConnectionError:
        return True
    return False


def listening_addresses(port: int) -> set[str]:
    """IP addresses this process listens on at TCP ``port``."""
    return {
        c.laddr.ip
        for c in psutil.Process().net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
    }


class Scrape:
    """One exposition, parsed with prometheus-client's parser (of the text format,
    unless another is given)."""

    def __init__(
        self,
        text: str,
        parse: Callable[[str], Iterable[Metric]] = text_string_to_metric_families,
    ) -> None:
        self.text = text
        self.families = {f.name: f for f in parse(text) if f.name.startswith("bgpool_")}
        self.samples: dict[tuple[str, str | None, str | None], float] = {}
        for family in self.families.values():
            for s in family.samples:
                # the third part: a bucket's bound, or a recycle's reason
                key = (s.name, s.labels.get("worker"), s.labels.get("le", s.labels.get("reason")))
                assert key not in self.samples, f"duplicate sample {key} in:\n{text}"
                self.samples[key] = s.value

    def workers(self) -> set[str]:
        return {w for (_, w, _) in self.samples if w is not None}

    def get(self, sample: str, worker: str) -> float | None:
        return self.samples.get((sample, worker, None))

    def buckets(self, worker: str) -> list[tuple[float, float]]:
        out = [
            (float(le), v)
            for (name, w, le), v in self.samples.items()
            if name == "bgpool_worker_boot_seconds_bucket" and w == worker and le is not None
        ]
        return sorted(out)

    def values(self, worker: str) -> dict[str, float | None]:
        """The numbers of one ``worker`` label, by short name."""
        return {
            "total": self.get("bgpool_total_workers", worker),
            "ready": self.get("bgpool_ready_workers", worker),
            "crashes": self.get("bgpool_worker_crashes_total", worker),
            "restarts": self.get("bgpool_worker_restarts_total", worker),
            "boots": self.get("bgpool_worker_boot_seconds_count", worker),
        }

    def as_dict(self) -> dict[str, float]:
        return {f"{n}|{w}|{le}": v for (n, w, le), v in sorted(self.samples.items(), key=str)}


def scrape(port: int) -> Scrape:
    status, ctype, body = http_get(port, "/metrics")
    assert status == 200, (status, body)
    assert ctype.startswith("text/plain"), ctype
    return Scrape(body)


def scrape_registry(registry: CollectorRegistry) -> Scrape:
    return Scrape(generate_latest(registry).decode())


def wait_values(
    get: Callable[[], Scrape], expected: Mapping[str, Mapping[str, float]], timeout: float = 10.0
) -> Scrape:
    """Scrape until every worker label has (at least) the ``expected`` values; the
    failure message shows what was served last."""
    last: list[Scrape] = []

    def check() -> bool:
        s = get()
        last[:] = [s]
        return all({k: s.values(w)[k] for k in want} == want for w, want in expected.items())

    try:
        wait_for(check, timeout=timeout, what="metric values")
    except AssertionError:
        got = {w: last[0].values(w) for w in expected} if last else None
        raise AssertionError(f"metrics never reached {expected}; last served {got}") from None
    return last[0]


def wait_ready(pool: Any, name: str, count: int, scope: str = "") -> None:
    """Wait until ``count`` instances of ``name`` are ready (``start()`` returns
    once each eager *name* is ready, not necessarily every instance)."""
    wait_for(
        lambda: sum(s.state == "ready" for s in statuses(pool, name) if s.scope == scope) == count,
        timeout=10,
        what=f"{count} ready instances of {scope}:{name}",
    )


def check_exposition(s: Scrape) -> None:
    """Names, types and labels of every bgpool series."""
    types = {name: fam.type for name, fam in s.families.items()}
    assert types == FAMILIES, types
    for name, family in s.families.items():
        for sample in family.samples:
            worker = sample.labels.get("worker")
            assert worker is not None, f"{sample} has no worker label"
            assert LABEL_RE.fullmatch(worker), f"label {worker!r} of {sample.name}"
            extra = set(sample.labels) - {"worker"}
            if sample.name.endswith("_bucket"):
                assert extra == {"le"}, sample
            elif name == "bgpool_worker_recycles":
                assert extra == {"reason"}, sample
                assert sample.labels["reason"] in ("memory", "lifetime"), sample
            else:
                assert not extra, sample
        names = {sample.name for sample in family.samples}
        if family.type == "counter":
            assert f"{name}_total" in names, names
            assert names <= {f"{name}_total", f"{name}_created"}, names
        elif family.type == "gauge":
            assert names == {name}, names
        else:
            assert names == {f"{name}_bucket", f"{name}_count", f"{name}_sum"}, names
    for worker in s.workers():
        buckets = s.buckets(worker)
        assert buckets, f"no boot buckets for {worker}"
        assert buckets[-1][0] == float("inf"), buckets
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), f"buckets of {worker} not cumulative: {buckets}"
        assert buckets[-1][1] == s.get("bgpool_worker_boot_seconds_count", worker)


# ------------------------------------------------------------------------ tests


def test_names_types_and_labels_of_every_series(make_pool: Callable[..., Any]) -> None:
    api = bgpool.next_scope("api")
    pool = make_pool(
        [
            spec("alpha", "idle", num=2),
            spec("beta", "slow_ready", num=1, env={"DELAY": "0.3"}),
            spec("lazy", "idle"),
            spec(None, "idle"),
            spec("delta", "idle", num=1, scope=api),
            spec(None, "idle", scope=api),
        ],
        metrics_port=0,
    )
    pool.ensure("tenant-x")
    pool.ensure("t-api", scope=api)
    wait_ready(pool, "alpha", 2)
    port = pool.metrics_port
    assert isinstance(port, int) and port > 0

    s = scrape(port)
    check_exposition(s)
    expected = {"m#:alpha", "m#:beta", "m#:tenant-x", "m#api:delta", "m#api:t-api"}
    assert expected <= s.workers(), s.text
    assert all(LABEL_RE.fullmatch(w) for w in s.workers())
    parsed = {LABEL_RE.fullmatch(w).groups() for w in expected}  # type: ignore[union-attr]
    assert parsed == {("", "alpha"), ("", "beta"), ("", "tenant-x"), ("api", "delta"),
                      ("api", "t-api")}  # fmt: skip
    # catch-all instances are labelled with the name they were ensured under
    assert not any(w.endswith(":None") or w in ("m#:", "m#api:") for w in s.workers())

    assert s.values("m#:alpha") == {"total": 2, "ready": 2, "crashes": 0, "restarts": 0, "boots": 2}
    for w in ("m#:beta", "m#:tenant-x", "m#api:delta", "m#api:t-api"):
        assert s.values(w) == {"total": 1, "ready": 1, "crashes": 0, "restarts": 0, "boots": 1}, w
    if "m#:lazy" in s.workers():  # a lazy worker never ensured is not ready
        assert s.values("m#:lazy")["ready"] == 0
        assert s.values("m#:lazy")["boots"] == 0

    # the histogram measures spawn-to-ready in seconds: beta sleeps 0.3 s first
    total = s.get("bgpool_worker_boot_seconds_sum", "m#:beta")
    assert total is not None and 0.3 <= total < 10, total
    assert all(v == 0 for le, v in s.buckets("m#:beta") if le < 0.3), s.buckets("m#:beta")
    alpha_sum = s.get("bgpool_worker_boot_seconds_sum", "m#:alpha")
    assert alpha_sum is not None and 0 < alpha_sum < 10


def test_values_after_crashes_clean_exits_and_kills(
    make_pool: Callable[..., Any], sentinel_dir: Path
) -> None:
    pool = make_pool(
        [
            spec("steady", "idle", num=1),
            spec("crashy", "crash_after_ready", num=1,
                 env={"CRASHES": "1", "STARTS": str(sentinel_dir / "crashy")}),
            spec("quitter", "exit_after_ready", num=1,
                 env={"EXITS": "1", "STARTS": str(sentinel_dir / "quitter")}),
            spec("victim", "idle", num=1),
            spec("flaky", "flaky_boot",
                 env={"BOOT_CRASHES": "2", "STARTS": str(sentinel_dir / "flaky")}),
        ],
        metrics_port=0,
    )  # fmt: skip
    port = pool.metrics_port

    def get() -> Scrape:
        return scrape(port)

    s = wait_values(
        get,
        {
            "m#:steady": {"total": 1, "ready": 1, "crashes": 0, "restarts": 0, "boots": 1},
            # raised after readiness once: one crash, one respawn, two boots
            "m#:crashy": {"total": 1, "ready": 1, "crashes": 1, "restarts": 1, "boots": 2},
            # returned (status 0) once: a respawn but no crash
            "m#:quitter": {"total": 1, "ready": 1, "crashes": 0, "restarts": 1, "boots": 2},
            "m#:victim": {"total": 1, "ready": 1, "crashes": 0, "restarts": 0, "boots": 1},
        },
    )
    check_exposition(s)

    (victim,) = statuses(pool, "victim")
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)  # death by a signal is a crash
    pool.ensure("flaky")  # two boot failures (exit status 1), then ready
    s = wait_values(
        get,
        {
            "m#:victim": {"total": 1, "ready": 1, "crashes": 1, "restarts": 1, "boots": 2},
            "m#:flaky": {"total": 1, "ready": 1, "crashes": 2, "restarts": 2, "boots": 1},
        },
    )
    check_exposition(s)
    # the others did not move: nothing is counted twice
    assert s.values("m#:crashy") == {"total": 1, "ready": 1, "crashes": 1, "restarts": 1,
                                     "boots": 2}  # fmt: skip
    assert s.values("m#:quitter") == {"total": 1, "ready": 1, "crashes": 0, "restarts": 1,
                                      "boots": 2}  # fmt: skip
    assert s.values("m#:steady") == {"total": 1, "ready": 1, "crashes": 0, "restarts": 0,
                                     "boots": 1}  # fmt: skip


def test_restart_workers_counts_restarts_not_crashes(make_pool: Callable[..., Any]) -> None:
    pool = make_pool(
        [
            spec("one", "idle", num=1),
            spec("two", "idle", num=2),
            spec("stubborn", "stuck", num=1),  # ignores the drain and SIGTERM: SIGKILLed
            spec("never-ensured", "idle"),
        ],
        metrics_port=0,
        restart_grace_period=0.3,
        grace_period=0.3,
    )
    port = pool.metrics_port
    wait_ready(pool, "two", 2)
    before = scrape(port)
    assert before.values("m#:one") == {"total": 1, "ready": 1, "crashes": 0, "restarts": 0,
                                       "boots": 1}  # fmt: skip
    assert before.values("m#:two") == {"total": 2, "ready": 2, "crashes": 0, "restarts": 0,
                                       "boots": 2}  # fmt: skip
    old_pids = {s.pid for s in pool.status() if s.pid}

    pool.restart_workers()

    s = wait_values(
        lambda: scrape(port),
        {
            "m#:one": {"total": 1, "ready": 1, "crashes": 0, "restarts": 1, "boots": 2},
            "m#:two": {"total": 2, "ready": 2, "crashes": 0, "restarts": 2, "boots": 4},
            # killed during the drain: not a crash
            "m#:stubborn": {"total": 1, "ready": 1, "crashes": 0, "restarts": 1, "boots": 2},
        },
    )
    check_exposition(s)
    assert not old_pids & {st.pid for st in pool.status() if st.pid}
    if "m#:never-ensured" in s.workers():  # stays unstarted
        assert s.values("m#:never-ensured")["restarts"] == 0
        assert s.values("m#:never-ensured")["boots"] == 0


def test_one_name_in_two_scopes_gives_two_series(make_pool: Callable[..., Any]) -> None:
    api = bgpool.next_scope("api")
    admin = bgpool.next_scope("admin")
    pool = make_pool(
        [
            spec("job", "idle", num=1),
            spec("job", "idle", num=1, scope=api),
            spec("job", "idle", num=2, scope=admin),
        ],
        metrics_port=0,
    )
    port = pool.metrics_port
    wait_ready(pool, "job", 2, scope="admin")
    s = scrape(port)
    check_exposition(s)
    assert {"m#:job", "m#api:job", "m#admin:job"} <= s.workers()
    assert s.values("m#:job") == {"total": 1, "ready": 1, "crashes": 0, "restarts": 0, "boots": 1}
    assert s.values("m#api:job") == {"total": 1, "ready": 1, "crashes": 0, "restarts": 0,
                                     "boots": 1}  # fmt: skip
    assert s.values("m#admin:job") == {"total": 2, "ready": 2, "crashes": 0, "restarts": 0,
                                       "boots": 2}  # fmt: skip

    (api_job,) = [st for st in pool.status() if st.name == "job" and st.scope == "api"]
    assert api_job.pid is not None
    os.kill(api_job.pid, signal.SIGKILL)
    s = wait_values(
        lambda: scrape(port),
        {"m#api:job": {"total": 1, "ready": 1, "crashes": 1, "restarts": 1, "boots": 2}},
    )
    assert s.values("m#:job")["crashes"] == 0
    assert s.values("m#admin:job")["crashes"] == 0
    assert s.values("m#:job")["restarts"] == 0
    assert s.values("m#admin:job")["restarts"] == 0


_CLIENT_SCRAPE = """
import bgpool, bgpool.metrics
from prometheus_client import CollectorRegistry, generate_latest
client = bgpool.connect()
registry = CollectorRegistry()
bgpool.metrics.collector(client, registry)
print(generate_latest(registry).decode(), end="")
"""


def test_collector_in_custom_registries_matches_the_endpoint(
    make_pool: Callable[..., Any], sentinel_dir: Path
) -> None:
    api = bgpool.next_scope("api")
    pool = make_pool(
        [
            spec("steady", "idle", num=2),
            spec("crashy", "crash_after_ready", num=1,
                 env={"CRASHES": "1", "STARTS": str(sentinel_dir / "crashy")}),
            spec("steady", "idle", num=1, scope=api),
        ],
        metrics_port=0,
    )  # fmt: skip
    port = pool.metrics_port
    quiet = {
        "m#:steady": {"total": 2, "ready": 2, "crashes": 0, "restarts": 0, "boots": 2},
        "m#:crashy": {"total": 1, "ready": 1, "crashes": 1, "restarts": 1, "boots": 2},
        "m#api:steady": {"total": 1, "ready": 1, "crashes": 0, "restarts": 0, "boots": 1},
    }
    endpoint = wait_values(lambda: scrape(port), quiet)

    own = CollectorRegistry()
    bgpool.metrics.collector(pool, own)
    in_process = scrape_registry(own)
    check_exposition(in_process)

    client = bgpool.connect()
    try:
        via_client = CollectorRegistry()
        bgpool.metrics.collector(client, via_client)
        from_client = scrape_registry(via_client)
    finally:
        client.close()

    proc = run_python(_CLIENT_SCRAPE)
    assert proc.returncode == 0, proc.stderr
    other_process = Scrape(proc.stdout)
    check_exposition(other_process)

    # the same numbers whoever scrapes, from whichever process
    assert in_process.as_dict() == endpoint.as_dict()
    assert from_client.as_dict() == endpoint.as_dict()
    assert other_process.as_dict() == endpoint.as_dict()
    from prometheus_client import REGISTRY

    assert b"bgpool_total_workers" not in generate_latest(REGISTRY)  # only where asked

    # collected at scrape time: a later crash shows in the same registry
    (steady,) = [st for st in statuses(pool, "steady") if st.scope == "api"]
    assert steady.pid is not None
    os.kill(steady.pid, signal.SIGKILL)
    wait_values(
        lambda: scrape_registry(own),
        {"m#api:steady": {"crashes": 1, "restarts": 1, "boots": 2, "ready": 1}},
    )


def test_no_port_without_metrics_port(make_pool: Callable[..., Any]) -> None:
    pool = make_pool([spec("w", "idle", num=1)])
    assert pool.metrics_port is None
    assert not [
        c for c in psutil.Process().net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN
    ]
    # the collector works without an HTTP port
    registry = CollectorRegistry()
    bgpool.metrics.collector(pool, registry)
    assert scrape_registry(registry).values("m#:w")["ready"] == 1


def _waiting_names(data: dict[str, Any]) -> set[str]:
    """The names ``/readyz`` lists as waiting (an instance suffix ``.N`` dropped)."""
    return {re.sub(r"\.\d+$", "", str(w)) for w in data.get("waiting") or []}


def test_readyz_names_eager_workers_until_ready_then_200(
    make_pool: Callable[..., Any], sentinel_dir: Path
) -> None:
    gate = sentinel_dir / "gate"
    api = bgpool.next_scope("api")
    pool = make_pool(
        [
            spec("quick", "idle", num=1),
            spec("gated", "obs_gated", num=2, env={"GATE": str(gate)}),
            spec("gated", "obs_gated", num=1, scope=api, env={"GATE": str(gate)}),
            spec("lazy", "idle"),  # lazy: never a reason to be unready
            spec(None, "idle"),
        ],
        metrics_port=0,
        start=False,
    )
    errors: list[BaseException] = []

    def start() -> None:
        try:
            pool.start()
        except BaseException as exc:
            errors.append(exc)

    starter = threading.Thread(target=start)
    starter.start()
    try:
        port = wait_for(lambda: pool.metrics_port, timeout=10, what="the metrics port")
        assert listening_addresses(port) == {"127.0.0.1"}  # the default host

        status, ctype, body = http_get(port, "/healthz")
        assert (status, json.loads(body)) == (200, {"ok": True})
        assert ctype.startswith("application/json")

        last: list[Any] = []

        def only_gated_waiting() -> Any:
            code, _, text = http_get(port, "/readyz")
            data = json.loads(text)
            last[:] = [(code, data)]
            return (code, data) if _waiting_names(data) == {"gated", "api:gated"} else None

        try:
            code, data = wait_for(only_gated_waiting, timeout=10, what="/readyz")
        except AssertionError:
            raise AssertionError(f"/readyz never named just the gated workers: {last}") from None
        assert code == 503
        assert data["ok"] is False
        status, ctype, _ = http_get(port, "/readyz")
        assert status == 503 and ctype.startswith("application/json")
        assert starter.is_alive(), "start() returned before every eager worker was ready"

        during = scrape(port)  # /metrics is served during start() too
        assert during.values("m#:gated")["total"] == 2
        assert during.values("m#:gated")["ready"] == 0
        assert during.values("m#:quick")["ready"] == 1
    finally:
        gate.touch()
        starter.join(20)
    assert not starter.is_alive()
    assert not errors, errors

    def ready() -> Any:
        code, ctype, text = http_get(port, "/readyz")
        return (code, ctype, json.loads(text)) if code == 200 else None

    # start() returned, so every eager worker is ready: /readyz agrees at once
    got = ready()
    assert got is not None, http_get(port, "/readyz")
    _, ctype, data = got
    assert data["ok"] is True
    assert not data.get("waiting")
    assert ctype.startswith("application/json")
    status, _, body = http_get(port, "/healthz")
    assert (status, json.loads(body)) == (200, {"ok": True})

    pool.shutdown()
    assert refused(port), "the metrics port is still open after shutdown()"


def test_healthz_503_once_the_supervisor_is_gone(make_pool: Callable[..., Any]) -> None:
    pool = make_pool([spec("w", "idle", num=1)], metrics_port=0)
    port = pool.metrics_port
    assert http_get(port, "/healthz")[0] == 200
    assert http_get(port, "/readyz")[0] == 200
    (w,) = statuses(pool, "w")
    assert w.pid is not None
    supervisor_of(w.pid).kill()

    def unhealthy() -> Any:
        code, _, body = http_get(port, "/healthz")
        return (code, body) if code != 200 else None

    code, body = wait_for(unhealthy, timeout=10, what="/healthz to fail")
    assert code == 503
    assert json.loads(body)["ok"] is False
    pool.shutdown()
    assert refused(port)


def test_metrics_host_is_honoured(make_pool: Callable[..., Any]) -> None:
    pool = make_pool([spec("w", "idle", num=1)], metrics_port=0, metrics_host="0.0.0.0")
    port = pool.metrics_port
    assert listening_addresses(port) == {"0.0.0.0"}
    assert scrape(port).values("m#:w")["ready"] == 1


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz"])
def test_endpoints_answer_many_concurrent_scrapes(make_pool: Callable[..., Any], path: str) -> None:
    pool = make_pool([spec("w", "idle", num=2)], metrics_port=0)
    port = pool.metrics_port
    wait_ready(pool, "w", 2)
    results: list[int] = []
    lock = threading.Lock()

    def hit() -> None:
        for _ in range(5):
            code = http_get(port, path)[0]
            with lock:
                results.append(code)

    threads = [threading.Thread(target=hit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [200] * 30


# ------------------------------------------------------- the /metrics protocol


def test_metrics_speak_openmetrics_when_the_scraper_asks(make_pool: Callable[..., Any]) -> None:
    pool = make_pool([spec("w", "idle", num=2), spec("c", "idle", num=1)], metrics_port=0)
    port = pool.metrics_port
    wait_ready(pool, "w", 2)
    accept = "application/openmetrics-text; version=1.0.0; charset=utf-8"
    status, headers, body = http_fetch(port, "/metrics", {"Accept": accept})
    assert status == 200
    assert headers.get("Content-Type", "").startswith("application/openmetrics-text"), headers
    text = body.decode()
    assert text.endswith("# EOF\n"), text[-200:]
    openmetrics = Scrape(text, openmetrics_families)  # its parser rejects what is not OpenMetrics
    check_exposition(openmetrics)
    assert openmetrics.values("m#:w") == {
        "total": 2, "ready": 2, "crashes": 0, "restarts": 0, "boots": 2
    }  # fmt: skip
    assert openmetrics.as_dict() == scrape(port).as_dict()  # the same numbers as the text format

    status, headers, body = http_fetch(port, "/metrics", {"Accept": "text/plain"})
    assert status == 200
    assert headers.get("Content-Type", "").startswith("text/plain"), headers
    assert b"# EOF" not in body


def test_metrics_are_gzipped_when_the_scraper_accepts_it(make_pool: Callable[..., Any]) -> None:
    pool = make_pool([spec("w", "idle", num=2)], metrics_port=0)
    port = pool.metrics_port
    wait_ready(pool, "w", 2)
    status, headers, body = http_fetch(port, "/metrics", {"Accept-Encoding": "gzip"})
    assert status == 200
    assert headers.get("Content-Encoding") == "gzip", headers
    assert headers.get("Content-Type", "").startswith("text/plain"), headers
    zipped = Scrape(gzip.decompress(body).decode())
    check_exposition(zipped)
    assert zipped.as_dict() == scrape(port).as_dict()

    status, headers, body = http_fetch(
        port, "/metrics", {"Accept": "application/openmetrics-text", "Accept-Encoding": "gzip"}
    )
    assert (status, headers.get("Content-Encoding")) == (200, "gzip"), headers
    assert gzip.decompress(body).decode().endswith("# EOF\n")

    _, headers, body = http_fetch(port, "/metrics")  # identity: not compressed
    assert headers.get("Content-Encoding") is None, headers
    assert Scrape(body.decode()).values("m#:w")["ready"] == 2


def test_metrics_name_filter_serves_only_the_named_series(make_pool: Callable[..., Any]) -> None:
    pool = make_pool([spec("w", "idle", num=2)], metrics_port=0)
    port = pool.metrics_port
    wait_ready(pool, "w", 2)
    query = "?name[]=bgpool_ready_workers&name[]=bgpool_worker_crashes_total"
    status, _, body = http_get(port, "/metrics" + query)
    assert status == 200
    s = Scrape(body)
    assert set(s.families) == {"bgpool_ready_workers", "bgpool_worker_crashes"}, body
    assert {name for name, _, _ in s.samples} == {
        "bgpool_ready_workers", "bgpool_worker_crashes_total"
    }  # fmt: skip
    assert s.values("m#:w")["ready"] == 2


def test_other_paths_are_not_found(make_pool: Callable[..., Any]) -> None:
    pool = make_pool([spec("w", "idle", num=1)], metrics_port=0)
    port = pool.metrics_port
    for path in ("/index.html", "/metrics/", "/metricsx", "/favicon.ico", "/healthz/x"):
        status, _, body = http_get(port, path)
        assert status == 404, (path, status, body)
        assert "/metrics" in body
