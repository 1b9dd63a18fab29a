"""The supervisor's end of its coordinator process (`coordinator/main.py`): start
it, send it messages without blocking, read its reports, close it.

The coordinator is a fresh interpreter (it imports redis, which the supervisor
never does) on the other end of a socketpair (SOCK_SEQPACKET: one JSON object a
packet). Messages to it are queued while its socket is full, so the loop never
blocks on a coordinator that does not read (frozen: its leases then run out on
the supervisor's own timers, `leases.py`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import selectors
import socket
import sys
from collections.abc import Callable

from .. import platform, protocol
from ..launch import python_command
from ..protocol import Message
from .core import Settings

log = logging.getLogger("bgpool")

RELEASE_SECONDS = 1.0
"""How long a closing supervisor waits for its coordinator to carry out the
releases it was sent (so other pools take over at once, not once they expire)."""


class Link:
    """One coordinator process, seen from the supervisor's loop."""

    def __init__(
        self,
        selector: selectors.BaseSelector,
        settings: Settings,
        supervisor_pid: int,
        on_message: Callable[[Message], None],
        on_gone: Callable[[], None],
    ) -> None:
        self._selector = selector
        self._settings = settings
        self._supervisor = supervisor_pid
        self._on_message = on_message
        self._on_gone = on_gone
        self._sock: socket.socket | None = None
        self._pid = 0
        self._outbox: list[bytes] = []

    @property
    def running(self) -> bool:
        """Whether a coordinator is there to talk to."""
        return self._sock is not None

    def start(self) -> None:
        """Start a coordinator process (OSError if it cannot be made)."""
        settings = self._settings
        assert settings.coordinator is not None and settings.name is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            theirs.set_inheritable(True)
            command = python_command(
                "bgpool.coordinator.main", "main", str(theirs.fileno()), str(self._supervisor),
                settings.name, settings.coordinator, repr(settings.lease_ttl),
            )  # fmt: skip
            try:
                self._pid = os.posix_spawn(sys.executable, command, os.environ)
            except OSError:
                ours.close()
                raise
        ours.setblocking(False)
        self._sock = ours
        self._selector.register(ours, selectors.EVENT_READ, self._on_ready)

    def tell(self, message: Message) -> None:
        """Send one message (queued while the coordinator does not read; dropped
        if there is none: a new one is told what it needs when it starts)."""
        if self._sock is None:
            return
        self._outbox.append(json.dumps(message).encode())
        self._flush()

    def _flush(self) -> None:
        assert self._sock is not None
        while self._outbox:
            try:
                self._sock.send(self._outbox[0])
            except BlockingIOError:
                break
            except OSError:
                self._outbox.clear()
                return
            self._outbox.pop(0)
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._outbox else 0)
        self._selector.modify(self._sock, events, self._on_ready)

    def _on_ready(self, _sock: object) -> None:
        """The coordinator wrote, or its socket can take more of the outbox."""
        if self._outbox:
            self._flush()
        self.receive()

    def receive(self) -> None:
        """Handle every report the coordinator has sent so far (the loop does
        on each wake-up; a timer about to give a lease up does first, in case
        a renewal waits unread: the supervisor was frozen, and its timers came
        due before its next `select()`)."""
        while self._sock is not None:
            data = protocol.available(self._sock)
            if data is None:
                return
            if not data:
                self._drop()
                self._on_gone()
                return
            self._on_message(json.loads(data))

    def _drop(self) -> None:
        assert self._sock is not None
        self._selector.unregister(self._sock)
        self._sock.close()
        self._sock = None
        self._outbox.clear()

    def close(self) -> None:
        """Teardown (the loop has ended): send what is queued (releases), close
        the socket, and give the coordinator `RELEASE_SECONDS` to carry them
        out and exit at EOF before the leftovers are killed."""
        if self._sock is None:
            return
        self._sock.settimeout(RELEASE_SECONDS)
        with contextlib.suppress(OSError):
            for data in self._outbox:
                self._sock.send(data)
        self._sock.close()
        self._sock = None
        with contextlib.suppress(OSError):  # gone (and reaped) already: nothing to wait for
            pidfd = platform.pidfd_open(self._pid)
            try:
                select.select([pidfd], [], [], RELEASE_SECONDS)
            finally:
                os.close(pidfd)
