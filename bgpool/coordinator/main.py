"""The coordinator: one small process per pool that has singleton workers, which
takes, renews and releases their leases on Redis and tells the supervisor.

    supervisor ── socketpair (SOCK_SEQPACKET, one JSON object a packet) ──▶ coordinator ── Redis
      want KEY [token fence until]   contend for KEY (or go on renewing one held)
      ready KEY fence                its worker is ready: say so in Redis
      lost KEY fence                 the supervisor gave it up: never renew it
      release KEY fence              its worker is gone: delete it (if still ours)
      ◀── acquired KEY fence token until start_at | renewed KEY fence until
      ◀── lost KEY fence why | holder KEY {host pid since lease_token ready} or null

Why a process of its own (the supervisor/leases.py opening says more): redis-py
is blocking, and the supervisor must neither block nor start a thread (it forks
workers). Here blocking is harmless: every command has a timeout well inside a
renewal period, and the deadlines it reports are absolute times computed from
when each command was sent, so a late report (this process was slow, or
frozen) is still a correct one. The supervisor enforces them with its own
timers, and each singleton worker with its own kernel timer, so nothing depends
on this process keeping up: if it stops, its leases run out and their workers
are killed before the leases can expire in Redis.

Started by the supervisor as a fresh interpreter (it imports redis, which the
supervisor never does), with SIGKILL as its parent-death signal; it also exits
at EOF on its socket. It never releases a lease on its own: only when the
supervisor says the lease's worker has exited (at EOF, a held lease simply runs
out: the worker may still be alive for a moment).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import select
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

from .. import leases, platform
from ..leases import Keys
from .store import Errors, Store, Taken

log = logging.getLogger("bgpool.coordinator")


@dataclass(eq=False)
class Lease:
    """One singleton this pool contends for or holds."""

    key: str
    keys: Keys
    token: str | None = None  # ours, while held
    fence: int = 0
    until: float = 0.0  # the safe deadline (boottime) while held
    due: float = 0.0  # the next take or renewal
    holder: dict[str, Any] | None = None  # the holder elsewhere, as last told


class Coordinator:
    """The loop: wait for the supervisor's word or the next due lease, act."""

    def __init__(self, sock: socket.socket, store: Store, pool: str, ttl: float) -> None:
        self.sock = sock
        self.store = store
        self.pool = pool
        self.ttl = ttl
        self.leases: dict[str, Lease] = {}
        self.reachable = True  # Redis answered the last command (logged when it changes)

    def run(self) -> None:
        """Serve until the supervisor closes its end."""
        while True:
            due = min((lease.due for lease in self.leases.values()), default=None)
            timeout = None if due is None else max(0.0, due - platform.boottime())
            readable, _, _ = select.select([self.sock], [], [], timeout)
            if readable:
                data = self.sock.recv(65536)
                if not data:
                    return
                self.on_message(json.loads(data))
            now = platform.boottime()
            for lease in [lease for lease in self.leases.values() if lease.due <= now]:
                self.step(lease)

    def send(self, message: dict[str, Any]) -> None:
        """Tell the supervisor (a full socket buffer blocks: it reads at once)."""
        self.sock.send(json.dumps(message).encode())

    def on_message(self, message: dict[str, Any]) -> None:
        """The supervisor's word about one lease."""
        kind, key = message["t"], message["key"]
        lease = self.leases.get(key)
        fence = message.get("fence")
        if kind == "want":
            if lease is None:
                lease = self.leases[key] = Lease(key, Keys.of(self.pool, key))
            if message.get("token"):  # resume one held (this process was restarted)
                lease.token, lease.fence = message["token"], int(message["fence"])
                lease.until = message["until"]
            self.step(lease)
        elif lease is None or (fence is not None and lease.token and fence != lease.fence):
            return  # about a lease we no longer hold
        elif kind == "ready" and lease.token is not None:
            self._call(lambda: self.store.mark_ready(lease.keys, lease.token or ""))
        elif kind in ("lost", "release"):
            del self.leases[key]
            if kind == "release" and lease.token is not None:
                self._call(lambda: self.store.release(lease.keys, lease.token or ""))

    def step(self, lease: Lease) -> None:
        """Renew a held lease, or try to take one: what is due for it."""
        if lease.token is not None:
            self._renew(lease)
        else:
            self._take(lease)

    def _renew(self, lease: Lease) -> None:
        sent = platform.boottime()
        if sent >= lease.until:  # its worker is dead or dying: renewing would lie
            self._lose(lease, "it was not renewed before its safe deadline")
            return
        renewed = self._call(lambda: self.store.renew(lease.keys, lease.token or "", self.ttl))
        if renewed is None:
            lease.due = min(sent + leases.retry_period(self.ttl), lease.until)
        elif not renewed:
            self._lose(lease, "it expired in the coordinator, or another pool took it")
        else:
            lease.until = leases.safe_deadline(sent, self.ttl)
            lease.due = sent + leases.renew_period(self.ttl)
            self.send({"t": "renewed", "key": lease.key, "fence": lease.fence,
                       "until": lease.until})  # fmt: skip

    def _take(self, lease: Lease) -> None:
        sent = platform.boottime()
        token = secrets.token_hex(16)
        lease.due = sent + leases.renew_period(self.ttl)
        found = self._call(lambda: self.store.take(lease.keys, token, self.ttl))
        if isinstance(found, Taken):
            lease.token, lease.fence = token, found.fence
            lease.until = leases.safe_deadline(sent, self.ttl)
            lease.holder = None
            log.info("lease of %s taken, fencing token %d", lease.key, found.fence)
            start_at = platform.boottime() + found.wait  # from the reply: later than Redis's
            self.send({"t": "acquired", "key": lease.key, "fence": found.fence, "token": token,
                       "until": lease.until, "start_at": start_at})  # fmt: skip
        elif found is not None or self.reachable:
            holder = found if isinstance(found, dict) else None
            if holder != lease.holder:
                lease.holder = holder
                self.send({"t": "holder", "key": lease.key, "holder": holder})

    def _lose(self, lease: Lease, why: str) -> None:
        log.warning("lease of %s lost: %s", lease.key, why)
        del self.leases[lease.key]
        self.send({"t": "lost", "key": lease.key, "fence": lease.fence, "why": why})

    def _call(self, command: Any) -> Any:
        """Run one Redis command; None (logged once per outage) if Redis could
        not be reached or answer in time."""
        try:
            result = command()
        except Errors as exc:
            if self.reachable:
                log.warning("coordinator unreachable (%s): leases cannot be renewed", exc)
            self.reachable = False
            self.store.reset()
            return None
        if not self.reachable:
            log.warning("coordinator reachable again")
            self.reachable = True
        return result


def main() -> NoReturn:
    """Entry point: `ARGV: socket fd, supervisor pid, pool name, coordinator URL, lease ttl`."""
    fd, supervisor = int(sys.argv[1]), int(sys.argv[2])
    pool, url, ttl = sys.argv[3], sys.argv[4], float(sys.argv[5])
    platform.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != supervisor:
        os._exit(0)  # the supervisor died before the prctl took effect
    platform.close_fds_except({fd})
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the application's
    logging.basicConfig(
        format="bgpool[%(process)d] %(levelname)s %(message)s",
        level=os.environ.get("BGPOOL_LOG_LEVEL", "WARNING").upper(),
    )
    platform.set_process_title(f"bgpool: coordinator {pool}")
    sock = socket.socket(fileno=fd)
    store = Store(url, leases.renew_period(ttl) / 2, socket.gethostname(), supervisor)
    try:
        Coordinator(sock, store, pool, ttl).run()
    finally:
        store.close()
        os._exit(0)
