"""The supervisor's end of the control socket: a private AF_UNIX listener and
non-blocking connections that carry framed JSON requests and replies.

Security: the socket lives in a fresh 0700 directory (a named pool's: in its
name's 0700 directory, see `naming`) and is itself 0600; each peer's uid is
checked (SO_PEERCRED) on accept; requests are data only. A peer that sends
anything malformed is disconnected, never trusted further.
"""

from __future__ import annotations

import logging
import os
import selectors
import shutil
import socket
from collections.abc import Callable

from .. import platform, protocol
from ..naming import NameLock

log = logging.getLogger("bgpool")

RECV_SIZE = 65536


class Connection:
    """One client connection, driven by the supervisor's selector."""

    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector) -> None:
        self.sock = sock
        self.closed = False
        self._selector = selector
        self._decoder = protocol.FrameDecoder()
        self._out = bytearray()
        self.on_close: list[Callable[[], None]] = []
        self.on_flushed: Callable[[], None] | None = None  # run when the queue empties

    @property
    def pending(self) -> int:
        """Bytes queued for the peer and not yet written."""
        return len(self._out)

    def receive(self) -> list[protocol.Message] | None:
        """Read what is available; None when the peer is gone or misbehaved."""
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            return None
        if not data:
            return None
        try:
            return self._decoder.feed(data)
        except protocol.ProtocolError as exc:
            log.warning("dropping a control connection: %s", exc)
            return None

    def send(self, message: protocol.Message) -> None:
        """Queue `message`; write as much as the socket takes now."""
        if self.closed:
            return
        try:
            data = protocol.encode(message)
        except ValueError as exc:  # over the frame limit: a bug in a budget upstream
            log.error("a reply was too large to send, sending an error instead: %s", exc)
            text = f"the supervisor could not send its reply: {exc}"
            data = protocol.encode(protocol.error_reply("BgpoolError", text))
        self._out += data
        self.flush()

    def flush(self) -> None:
        """Write queued bytes; wait for writability if the peer is slow."""
        try:
            sent = self.sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        del self._out[:sent]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._out else 0)
        self._selector.modify(self.sock, events, self)
        if not self._out and self.on_flushed is not None:
            self.on_flushed()

    def close(self) -> None:
        """Forget the connection and run its close callbacks once."""
        if self.closed:
            return
        self.closed = True
        self._selector.unregister(self.sock)
        self.sock.close()
        for callback in self.on_close:
            callback()


class Listener:
    """The listening socket at `address`, in a private directory it removes;
    with the `lock` of a named pool, in the name's directory, which stays:
    closing removes the socket and the pid file, then lets go of the name."""

    def __init__(self, address: str, lock: NameLock | None = None) -> None:
        self.directory = os.path.dirname(address)
        self.address = address
        self.lock = lock
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(self.address)
            os.chmod(self.address, 0o600)
            self.sock.listen(512)
            self.sock.setblocking(False)
        except OSError:
            self.close()
            raise

    def accept(self) -> socket.socket | None:
        """A new connection from a peer with our uid, or None."""
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return None
        try:
            uid = platform.peer_uid(conn)
        except OSError:
            uid = -1
        if uid != os.getuid():
            log.warning("refused a control connection from uid %d", uid)
            conn.close()
            return None
        conn.setblocking(False)
        return conn

    def close(self) -> None:
        """Close the socket and remove its file and directory (a named pool's:
        its file and pid file, and let go of the name)."""
        self.sock.close()
        if self.lock is not None:
            self.lock.release()
        else:
            shutil.rmtree(self.directory, ignore_errors=True)
