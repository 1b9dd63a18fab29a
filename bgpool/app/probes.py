"""The answers of the health endpoints, computed in the process that owns the
pool (threads of its metrics server call them).

- `/healthz`: the supervisor process runs (the owner's watcher has not seen
  it exit).
- `/livez`: the supervisor's loop answers a round trip within
  `LIVENESS_DEADLINE` (a frozen or wedged supervisor is alive as a process
  but fails this one). `Heartbeat` keeps at most one round trip in flight,
  whoever asks: probes that arrive while the supervisor is frozen share one
  answer instead of piling up connections on its socket and threads here.
- `/readyz`: every eager worker is ready; `/readyz?worker=NAME&scope=LABEL`:
  that name is. Both read the readiness table, no round trip.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import texts
from ..errors import BgpoolError
from ..shm.table import Kind

if TYPE_CHECKING:
    from .pool import Pool

LIVENESS_DEADLINE = 1.0
"""Seconds the supervisor's loop has to answer `/livez`'s round trip."""

Answer = tuple[int, dict[str, Any]]
"""An endpoint's HTTP status code and its JSON body."""


class Heartbeat:
    """A round trip to the supervisor, shared by whoever asks at once.

    A caller that arrives while a round trip is under way waits for it and
    takes its result (it came back after the caller asked, so it is fresh
    enough for a probe); otherwise it makes one. So a frozen supervisor costs
    one pending connection and one blocked thread at a time, each for at most
    `deadline` seconds.
    """

    def __init__(self, ping: Callable[[float], object], deadline: float) -> None:
        self._ping = ping
        self._deadline = deadline
        self._lock = threading.Lock()
        self._last: tuple[float, bool, str | None] = (float("-inf"), False, None)

    def check(self) -> tuple[bool, str | None]:
        """(whether the loop answered, why not)."""
        asked = time.monotonic()
        if not self._lock.acquire(timeout=self._deadline * 2):
            return False, texts.PING_PENDING
        try:
            finished, ok, why = self._last
            if finished >= asked:  # a round trip that ended while we waited
                return ok, why
            try:
                self._ping(self._deadline)
                ok, why = True, None
            except BgpoolError as exc:
                ok, why = False, str(exc)
            self._last = (time.monotonic(), ok, why)
            return ok, why
        finally:
            self._lock.release()


class Probes:
    """The probes of one `Pool`, as its metrics server answers them."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self.heartbeat = Heartbeat(self._ping, LIVENESS_DEADLINE)

    def _ping(self, timeout: float) -> None:
        if not self.running():
            raise BgpoolError(texts.POOL_NOT_RUNNING)
        if not self._pool._attached:  # still starting: the supervisor may not listen yet
            raise BgpoolError(texts.POOL_STARTING)
        self._pool._ping(timeout)

    def running(self) -> bool:
        """The supervisor process runs and the pool is not closing."""
        pool = self._pool
        process = pool._process
        running = process is not None and process.returncode is None
        return running and not pool._closing and not pool._gone

    def healthz(self) -> Answer:
        """200 while the supervisor process runs."""
        return (200 if self.running() else 503), {"ok": self.running()}

    def livez(self) -> Answer:
        """200 while the supervisor's loop answers within `LIVENESS_DEADLINE`."""
        ok, why = self.heartbeat.check()
        return (200, {"ok": True}) if ok else (503, {"ok": False, "error": why})

    def readyz(self) -> Answer:
        """200 once every eager worker's name is ready, else 503 naming those
        that are not (served from before the supervisor is up)."""
        pool = self._pool
        if not pool._attached:
            labels = {_label(s.scope.label, s.name) for s in pool.config.workers if s.num >= 1}
            return 503, {"ok": False, "waiting": sorted(labels)}
        eager = {(s.scope.id, s.name) for s in pool.config.workers if s.num >= 1}
        waiting = [
            _label(s.scope_label, s.name)
            for s in pool._reader().slots()
            if (s.scope_id, s.name) in eager and s.kind == Kind.NAMED
            and s.instance == 0 and s.eager and not s.name_ready
        ]  # fmt: skip
        ok = not waiting and self.running()
        return (200 if ok else 503), {"ok": ok, "waiting": waiting}

    def worker_ready(self, name: str, scope: str) -> Answer:
        """200 when worker `name` of the scope labelled `scope` ("" for the
        global scope) is ready (sticky across crash restarts, as for
        `ensure()`), 503 while it is not (or not hosted yet: a lazy or
        catch-all name), 404 when nothing declares it there."""
        pool = self._pool
        body: dict[str, Any] = {"ok": False, "worker": name, "scope": scope}
        declared = [d for d in pool.config.workers if d.scope.label == scope]
        if not declared:
            return 404, {**body, "error": texts.no_scope_labelled(scope)}
        if not any(d.name in (name, None) for d in declared):
            close = [d.name for d in declared if d.name is not None]
            return 404, {**body, "error": texts.not_declared(name, texts.closest(name, close))}
        if not self.running() or not pool._attached:
            why = texts.POOL_NOT_RUNNING if not self.running() else texts.POOL_STARTING
            return 503, {**body, "error": why}
        slots = [
            s
            for s in pool._reader().slots()
            if s.kind != Kind.FREE and s.name == name and s.scope_label == scope
        ]
        ok = any(s.name_ready for s in slots)
        states = [s.state.label for s in sorted(slots, key=lambda s: s.instance)]
        return (200 if ok else 503), {**body, "ok": ok, "states": states}


def _label(scope: str, name: str | None) -> str:
    """How `/readyz` names a worker: `name`, or `scope:name` outside the global scope."""
    return f"{scope}:{name}" if scope else str(name)
