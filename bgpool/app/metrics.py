"""Prometheus metrics and health endpoints, read from the readiness table.

The only module that imports prometheus_client. Nothing is counted on a hot
path: the supervisor keeps per-instance counters in the table anyway, and a
scrape turns them into metric families, so every process that can read the
table (the owner, a `connect()` client) reports the same numbers.

    registry = CollectorRegistry()
    bgpool.metrics.collector(pool, registry)   # into the application's registry

`PoolConfig.metrics_port` serves, on `metrics_host`, from the process that
owns the pool: `/metrics`, the probes (`/healthz`, `/livez`, `/readyz`, see
`probes`) and the status page (`/`, `/status.json`, see `statuspage`).
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .. import texts
from ..errors import BgpoolError
from ..shm.table import BOOT_BUCKETS, Kind, Slot
from ..states import State
from .probes import Answer, Probes
from .statuspage import page, status_document

if TYPE_CHECKING:
    from .client import PoolClient
    from .pool import Pool


def worker_label(scope_label: str, name: str) -> str:
    """The `worker` label: `m#<scope-label>:<name>` (regex `m#([^:]*):(.+)`)."""
    return f"m#{scope_label}:{name}"


LEASES_TIMEOUT = 2.0
"""Seconds a scrape waits for the supervisor's lease counters."""


class TableCollector(Collector):
    """Turns the readiness table into bgpool's metric families at scrape time."""

    def __init__(self, client: PoolClient) -> None:
        self._client = client

    @staticmethod
    def _families() -> tuple[
        GaugeMetricFamily,
        GaugeMetricFamily,
        CounterMetricFamily,
        CounterMetricFamily,
        CounterMetricFamily,
        CounterMetricFamily,
        HistogramMetricFamily,
    ]:
        """bgpool's metric families, without samples."""
        total = GaugeMetricFamily(
            "bgpool_total_workers", "Worker instances declared or hosted.", labels=["worker"]
        )
        ready = GaugeMetricFamily(
            "bgpool_ready_workers", "Worker instances ready now.", labels=["worker"]
        )
        crashes = CounterMetricFamily(
            "bgpool_worker_crashes",
            "Abnormal worker exits (non-zero status or a signal) outside a drain.",
            labels=["worker"],
        )
        restarts = CounterMetricFamily(
            "bgpool_worker_restarts",
            "Worker respawns: after a crash, a clean exit or restart_workers().",
            labels=["worker"],
        )
        hangs = CounterMetricFamily(
            "bgpool_worker_hangs",
            "Workers killed as hung: no heartbeat within heartbeat_timeout.",
            labels=["worker"],
        )
        recycles = CounterMetricFamily(
            "bgpool_worker_recycles",
            "Graceful restarts asked for by max_memory or max_lifetime, by reason.",
            labels=["worker", "reason"],
        )
        boot = HistogramMetricFamily(
            "bgpool_worker_boot_seconds",
            "Time from spawn to get_worker_handle().",
            labels=["worker"],
        )
        return total, ready, crashes, restarts, hangs, recycles, boot

    def describe(self) -> Iterator[Metric]:
        """The families, without samples: what a registry learns when this is
        registered, which may be before the pool's table exists (the metrics
        server binds its port before the supervisor starts)."""
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        """One sample per worker name (a pool's instances are summed)."""
        total, ready, crashes, restarts, hangs, recycles, boot = self._families()
        by_worker: dict[str, list[Slot]] = defaultdict(list)
        for slot in self._client._reader().slots():
            if slot.kind != Kind.FREE:
                by_worker[worker_label(slot.scope_label, slot.name)].append(slot)
        for label, slots in by_worker.items():
            total.add_metric([label], len(slots))
            ready.add_metric([label], sum(s.state == State.READY for s in slots))
            crashes.add_metric([label], sum(s.crashes for s in slots))
            restarts.add_metric([label], sum(s.restarts for s in slots))
            hangs.add_metric([label], sum(s.hangs for s in slots))
            recycles.add_metric([label, "memory"], sum(s.recycles_memory for s in slots))
            recycles.add_metric([label, "lifetime"], sum(s.recycles_lifetime for s in slots))
            counts = [sum(s.boot_buckets[i] for s in slots) for i in range(len(BOOT_BUCKETS))]
            cumulative, buckets = 0, []
            for bound, count in zip(BOOT_BUCKETS, counts, strict=True):
                cumulative += count
                buckets.append((_bound(bound), cumulative))
            boot.add_metric([label], buckets, sum_value=sum(s.boot_sum for s in slots))
        yield from (total, ready, crashes, restarts, hangs, recycles, boot)
        yield from self._lease_families()

    def _lease_families(self) -> Iterator[Metric]:
        """Each singleton's lease, as the supervisor counts it (one request per
        scrape, only for a pool with a coordinator: the table has no room for
        a holder's host): acquisitions and losses (counters), whether this
        pool holds it, and who does (`bgpool_lease_holder_info`, 1)."""
        if not self._client._coordinated:
            return
        try:
            reply = self._client._request({"op": "leases"}, timeout=LEASES_TIMEOUT)
        except BgpoolError:  # the pool is closing, or too busy: leave them out of this scrape
            return
        labels = ["worker"]
        acquired = CounterMetricFamily(
            "bgpool_lease_acquisitions", "Singleton leases this pool acquired.", labels=labels
        )
        lost = CounterMetricFamily(
            "bgpool_lease_losses", "Singleton leases this pool held and lost.", labels=labels
        )
        held = GaugeMetricFamily(
            "bgpool_lease_held", "1 while this pool holds the singleton's lease.", labels=labels
        )
        holder = GaugeMetricFamily(
            "bgpool_lease_holder_info",
            "The singleton's current holder (host, supervisor pid), as this pool sees it.",
            labels=["worker", "host", "pid"],
        )
        for lease in reply["leases"]:
            label = worker_label(lease["scope"], lease["name"])
            acquired.add_metric([label], lease["acquisitions"])
            lost.add_metric([label], lease["losses"])
            held.add_metric([label], 1 if lease["held"] else 0)
            if lease["holder"] is not None:
                who = lease["holder"]
                holder.add_metric([label, who["host"], str(who["pid"])], 1)
        yield from (acquired, lost, held, holder)


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


def collector(client: PoolClient, registry: CollectorRegistry | None = None) -> TableCollector:
    """Register bgpool's metrics for `client` (a `Pool` or a `connect()` client)
    into `registry` (prometheus_client's default registry if None)."""
    from prometheus_client import REGISTRY

    table_collector = TableCollector(client)
    (registry or REGISTRY).register(table_collector)
    return table_collector


WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

PATHS = ("/", "/status.json", "/metrics", "/livez", "/healthz", "/readyz")
"""What the metrics port serves (named by its 404 answer)."""

PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'"
)
"""The page's Content-Security-Policy: it may load nothing from anywhere, and
talk to its own origin only (for `/status.json`)."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds would flood stderr."""


class HealthServer:
    """The metrics port, over HTTP, in a background thread of the owning
    process (never in the supervisor, which must stay single-threaded to fork
    safely); each request in a thread of its own, so a probe waiting for a
    frozen supervisor holds up no scrape.

    `/metrics` is prometheus_client's own WSGI app over the server's registry, so
    a scraper gets what it would from any Prometheus client: the text format or
    OpenMetrics as its `Accept` header asks, gzip when it accepts it, `name[]=`
    filters. Only the probes, the status page and the 404 are routed here.
    """

    def __init__(self, pool: Pool, host: str, port: int) -> None:
        # auto_describe: the registry collects once now to learn the family
        # names, without which prometheus_client's `name[]=` filter finds none.
        self._registry = CollectorRegistry(auto_describe=True)
        self._registry.register(TableCollector(pool))
        self._pool = pool
        self._probes = Probes(pool)
        self._page = page()
        self._metrics: WSGIApp = make_wsgi_app(self._registry)
        self._server = make_server(host, port, self._app, _Server, _QuietHandler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="bgpool-metrics", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        """The port it listens on (useful when asked for port 0)."""
        return int(self._server.server_address[1])

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self._metrics(environ, start_response)
        if path == "/":
            headers = [("Content-Type", "text/html; charset=utf-8"),
                       ("Content-Security-Policy", PAGE_POLICY)]  # fmt: skip
            return _respond(start_response, 200, self._page, headers)
        answer = self._answer(
            path, parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        )
        if answer is None:
            plain = [("Content-Type", "text/plain; charset=utf-8")]
            return _respond(start_response, 404, texts.not_found(PATHS).encode(), plain)
        code, body = answer
        headers = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]
        return _respond(start_response, code, json.dumps(body).encode(), headers)

    def _answer(self, path: str, query: dict[str, list[str]]) -> Answer | None:
        """A JSON endpoint's answer (None: no such path)."""
        if path == "/status.json":
            return 200, status_document(self._pool, self._probes)
        if path == "/healthz":
            return self._probes.healthz()
        if path == "/livez":
            return self._probes.livez()
        if path != "/readyz":
            return None
        worker = query.get("worker", [""])[-1]
        if worker:
            return self._probes.worker_ready(worker, query.get("scope", [""])[-1])
        if "worker" in query or "scope" in query:
            return 400, {"ok": False, "error": texts.NO_WORKER_PARAMETER}
        return self._probes.readyz()

    def close(self) -> None:
        """Stop serving and close the listening socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def _respond(
    start_response: Callable[..., Any], code: int, body: bytes, headers: list[tuple[str, str]]
) -> list[bytes]:
    """A whole response: `code` with its reason phrase, `headers`, `body`."""
    start_response(f"{code} {HTTPStatus(code).phrase}", headers)
    return [body]
