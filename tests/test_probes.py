"""The orchestrators' probes on the metrics port: ``/livez`` (the supervisor's
loop answers a round trip within 1 s) and ``/readyz?worker=NAME&scope=LABEL``
(that name is ready), and what the other endpoints answer meanwhile, over real
HTTP on 127.0.0.1, against a real supervisor that is frozen (SIGSTOP) and
thawed (SIGCONT), killed, and whose workers are stopped, gated and crashed.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from helpers import http_get, since, spec, statuses, supervisor_pid, wait_for

import bgpool

FROZEN_ANSWER = 3.0
"""Seconds a probe may take to say 503 about a frozen supervisor (its round
trip's deadline is 1 s)."""


def answer(port: int, path: str) -> tuple[int, dict[str, Any]]:
    """The status code and JSON body of ``path``."""
    code, ctype, body = http_get(port, path)
    assert ctype.startswith("application/json"), (path, ctype)
    return code, json.loads(body)


@contextmanager
def frozen(pool: Any) -> Iterator[int]:
    """The pool's supervisor stopped (SIGSTOP) inside the block, continued after."""
    pid = supervisor_pid(pool)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)


def test_livez_is_200_while_the_loop_answers_503_while_it_is_frozen(
    make_pool: Callable[..., Any],
) -> None:
    pool = make_pool([spec("w", "idle", num=1)], metrics_port=0)
    port = pool.metrics_port
    assert answer(port, "/livez") == (200, {"ok": True})

    with frozen(pool):
        t0 = time.monotonic()
        code, body = answer(port, "/livez")
        assert since(t0) < FROZEN_ANSWER, since(t0)
        frozen_answer = {"ok": False, "error": "the supervisor did not answer within 1s"}
        assert (code, body) == (503, frozen_answer)
        # the process runs, and the table still answers what it can
        assert answer(port, "/healthz") == (200, {"ok": True})
        assert http_get(port, "/metrics")[0] == 200
        assert answer(port, "/readyz")[0] == 200
        # the status page's data: the table's part, the diagnostics missing, and why
        t0 = time.monotonic()
        code, body = answer(port, "/status.json")
        assert since(t0) < FROZEN_ANSWER, since(t0)
        assert code == 200
        assert (body["pool"]["running"], body["pool"]["live"]) == (True, False)
        assert [(s["name"], s["state"]) for s in body["status"]] == [("w", "ready")]
        assert body["diagnostics"] == []
        assert body["diagnostics_error"] == "the supervisor did not answer within 1s"

        # probes that arrive together share one round trip: each hears its
        # answer, none waits for another's round trip (or gives up waiting)
        results: list[tuple[int, dict[str, Any], float]] = []
        lock = threading.Lock()

        def probe() -> None:
            started = time.monotonic()
            code, body = answer(port, "/livez")
            with lock:
                results.append((code, body, since(started)))

        t0 = time.monotonic()
        threads = [threading.Thread(target=probe) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert [(code, body) for code, body, _ in results] == [(503, frozen_answer)] * 6, results
        assert since(t0) < FROZEN_ANSWER, results

    # thawed: the loop answers again (it also finds the abandoned connections)
    wait_for(lambda: answer(port, "/livez") == (200, {"ok": True}), timeout=5, what="/livez 200")
    assert pool.status()[0].state == "ready"


def test_livez_503_once_the_supervisor_is_gone(make_pool: Callable[..., Any]) -> None:
    pool = make_pool([spec("w", "idle", num=1)], metrics_port=0)
    port = pool.metrics_port
    assert answer(port, "/livez")[0] == 200
    os.kill(supervisor_pid(pool), signal.SIGKILL)

    def dead() -> Any:
        found = answer(port, "/livez")
        return found if found[0] != 200 else None

    code, body = wait_for(dead, timeout=10, what="/livez to fail")
    assert code == 503 and body["ok"] is False
    assert body["error"] in ("the pool is not running", "pool is closed"), body
    pool.shutdown()


def test_readyz_of_one_worker(make_pool: Callable[..., Any], sentinel_dir: Path) -> None:
    gate = sentinel_dir / "gate"
    api = bgpool.next_scope("api")
    pool = make_pool(
        [
            spec("steady", "idle", num=2),
            spec("gated", "obs_gated", env={"GATE": str(gate)}),  # lazy
            spec("never", "idle"),  # lazy, never ensured
            spec("job", "idle", num=1, scope=api),
            spec(None, "idle", scope=api),
        ],
        metrics_port=0,
    )
    port = pool.metrics_port
    wait_for(lambda: all(s.state == "ready" for s in statuses(pool, "steady")), what="2 ready")
    steady = {"ok": True, "worker": "steady", "scope": ""}
    assert answer(port, "/readyz?worker=steady") == (200, {**steady, "states": ["ready"] * 2})
    assert answer(port, "/readyz?worker=job&scope=api") == (
        200, {"ok": True, "worker": "job", "scope": "api", "states": ["ready"]}
    )  # fmt: skip

    # declared but not started, or started and not ready: 503
    assert answer(port, "/readyz?worker=never") == (
        503, {"ok": False, "worker": "never", "scope": "", "states": ["stopped"]}
    )  # fmt: skip
    with pytest.raises(bgpool.EnsureTimeout):
        pool.ensure("gated", timeout=0.2)
    code, body = answer(port, "/readyz?worker=gated")
    assert (code, body["ok"], body["states"]) == (503, False, ["starting"]), body
    gate.touch()
    pool.ensure("gated")
    assert answer(port, "/readyz?worker=gated")[0] == 200

    # a catch-all name: not ready until ensured, then ready
    assert answer(port, "/readyz?worker=tenant-a&scope=api")[0] == 503
    pool.ensure("tenant-a", scope=api)
    assert answer(port, "/readyz?worker=tenant-a&scope=api")[0] == 200

    # nothing declares it there: 404, saying what is missing
    assert answer(port, "/readyz?worker=job") == (
        404, {"ok": False, "worker": "job", "scope": "",
              "error": 'no background worker configured for name "job"'},
    )  # fmt: skip
    code, body = answer(port, "/readyz?worker=stedy")
    assert code == 404 and 'did you mean "steady"' in body["error"], body
    code, body = answer(port, "/readyz?worker=job&scope=apj")
    assert (code, body["error"]) == (404, "no declared scope is labelled 'apj'")
    for path in ("/readyz?scope=api", "/readyz?worker="):
        code, body = answer(port, path)
        assert code == 400, (path, body)
        assert body["error"] == "give the worker's name: /readyz?worker=NAME[&scope=LABEL]"

    # readiness is sticky across a crash restart, as for ensure()
    (first, _) = statuses(pool, "steady")
    assert first.pid is not None
    os.kill(first.pid, signal.SIGKILL)
    assert answer(port, "/readyz?worker=steady")[0] == 200
    # a stopped worker's name is not ready, until it is started again
    pool.stop("steady")
    code, body = answer(port, "/readyz?worker=steady")
    assert (code, body["states"]) == (503, ["stopped", "stopped"]), body
    pool.start_workers("steady")  # returns without waiting for readiness (SPEC)
    wait_for(lambda: answer(port, "/readyz?worker=steady")[0] == 200, what="ready again")


def test_a_worker_ready_during_its_stop_drain_stays_unready(
    make_pool: Callable[..., Any],
) -> None:
    pool = make_pool([spec("slow", "slow_ready", env={"DELAY": "0.5"})], metrics_port=0)
    port = pool.metrics_port
    with pytest.raises(bgpool.EnsureTimeout):
        pool.ensure("slow", timeout=0.1)
    pool.stop("slow")  # drains it while it boots; it takes its handle meanwhile, then exits
    (slow,) = statuses(pool, "slow")
    assert (slow.state, slow.ever_ready) == ("stopped", True)
    assert answer(port, "/readyz?worker=slow")[0] == 503
    pool.ensure("slow")  # started again, and ready
    assert answer(port, "/readyz?worker=slow")[0] == 200
