"""systemd's notify protocol (sd_notify(3)), spoken by `bgpool run` when the
service manager sets `NOTIFY_SOCKET` (`Type=notify`).

Each notification is one datagram of `KEY=VALUE` lines sent to the AF_UNIX
socket that `NOTIFY_SOCKET` names (a path, or an abstract name starting with
`@`). `bgpool run` sends:

- `READY=1` once the eager workers are ready (and COMMAND is started);
- `RELOADING=1` with `MONOTONIC_USEC=<CLOCK_MONOTONIC in µs>` as a reload
  begins, `READY=1` once it is over (applied or refused);
- `STOPPING=1` as the drain begins;
- `STATUS=<ready>/<total> workers ready` whenever it changes, where total is
  every instance that should be running (any state but `stopped`: eager
  instances and the lazy ones started so far);
- `WATCHDOG=1` every half of `WATCHDOG_USEC` while the supervisor answers a
  round trip (`Watchdog`), so a frozen or wedged supervisor gets the service
  restarted by systemd's watchdog. `WATCHDOG_PID`, when set, must be
  `bgpool run`'s own pid, else the watchdog is someone else's.

The variables are taken out of the environment once read (sd_notify's
`unset_environment`): the supervisor, the workers and COMMAND do not inherit
them, so none of them can speak for the service (a COMMAND that sent its own
`READY=1` would race bgpool's, before the pool is up).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..errors import BgpoolError
from ..models import WorkerStatus

SEND_TIMEOUT = 1.0
"""The longest a notification may block `bgpool run` (the manager's queue full)."""


class Notifier:
    """A datagram socket to the service manager's notify socket."""

    def __init__(self, address: str, watchdog_usec: int | None) -> None:
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._shown = address
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec else None
        """Seconds between two `WATCHDOG=1` (half of `WATCHDOG_USEC`), or None."""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.settimeout(SEND_TIMEOUT)
        self._failed = False
        self._status = ""

    @classmethod
    def from_environment(cls) -> Notifier | None:
        """The notifier `NOTIFY_SOCKET` asks for (None when unset), with the
        watchdog `WATCHDOG_USEC` asks for if it is meant for this process.
        Takes the three variables out of `os.environ`."""
        address = os.environ.pop("NOTIFY_SOCKET", "")
        usec = os.environ.pop("WATCHDOG_USEC", "")
        pid = os.environ.pop("WATCHDOG_PID", "")
        if not address:
            return None
        watchdog = int(usec) if usec.isdigit() and int(usec) > 0 else None
        if pid and pid != str(os.getpid()):
            watchdog = None
        return cls(address, watchdog)

    def send(self, *assignments: str) -> None:
        """One notification of `KEY=VALUE` lines. A manager that is gone or
        refuses is said once on stderr, and does not stop the pool."""
        try:
            self._sock.sendto("\n".join(assignments).encode(), self._address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                print(f"bgpool: cannot notify NOTIFY_SOCKET={self._shown}: {exc}", file=sys.stderr)

    def ready(self) -> None:
        """`READY=1`: started, or a reload is over."""
        self.send("READY=1", *([self._status] if self._status else []))

    def reloading(self) -> None:
        """`RELOADING=1` with the monotonic time the reload began."""
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={now}")

    def stopping(self) -> None:
        """`STOPPING=1`: the drain begins."""
        self.send("STOPPING=1")

    def status(self, text: str) -> None:
        """`STATUS=<text>`, sent only when it differs from the last one."""
        status = f"STATUS={text}"
        if status != self._status:
            self._status = status
            self.send(status)

    def close(self) -> None:
        self._sock.close()


class ReadyCount:
    """How many instances are ready out of those that should be running,
    followed through the pool's state-change events."""

    def __init__(self, statuses: Iterable[WorkerStatus]) -> None:
        self._states: dict[tuple[str, str, int], str] = {}
        self.refresh(statuses)

    def refresh(self, statuses: Iterable[WorkerStatus]) -> None:
        """Start again from the table (instances it no longer hosts drop out)."""
        self._states = {(s.scope, s.name, s.instance): s.state for s in statuses}

    def update(self, events: Iterable[Mapping[str, Any]]) -> None:
        """Apply state-change events (when the table cannot be read: a drain)."""
        for e in events:
            self._states[(e["scope"], e["worker"], e["instance"])] = e["state"]

    def text(self) -> str:
        """`<ready>/<total> workers ready` (a singleton on standby runs elsewhere: not counted)."""
        states = [s for s in self._states.values() if s not in ("stopped", "standby")]
        return f"{states.count('ready')}/{len(states)} workers ready"


class Watchdog:
    """A thread that sends `WATCHDOG=1` every `interval` seconds, each time
    after a round trip to the supervisor (`ping(timeout)`, raising
    `BgpoolError` when no answer comes): a supervisor that is frozen, wedged
    or gone stops the pings, and systemd's watchdog acts. A thread, not the
    loop of `bgpool run`: the round trip blocks, and must not hold up the
    signals that loop passes on."""

    def __init__(
        self, notifier: Notifier, interval: float, ping: Callable[[float], object]
    ) -> None:
        self._notifier = notifier
        self._interval = interval
        self._ping = ping
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bgpool-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        due = time.monotonic()
        while True:
            due = max(due + self._interval, time.monotonic())  # no burst after a stall
            if self._stop.wait(due - time.monotonic()):
                return
            with contextlib.suppress(BgpoolError):
                self._ping(self._interval)
                self._notifier.send("WATCHDOG=1")

    def close(self) -> None:
        """Stop pinging; returns once the thread is done (a round trip under
        way is given its timeout)."""
        self._stop.set()
        self._thread.join()
