"""Messages between bgpool's processes: length-prefixed JSON objects.

Used on the control socket (clients and supervisor) and on each worker's notify
pipe (worker to supervisor). JSON can only produce data, so nothing a peer
sends is ever executed; frames are capped so a peer cannot make the reader
buffer without bound.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

MAX_FRAME = 4 << 20
_LENGTH = struct.Struct(">I")

Message = dict[str, Any]


def available(sock: socket.socket, size: int = 65536) -> bytes | None:
    """What a non-blocking socket has to read now: None if nothing yet, b""
    once the peer is gone (or the socket failed)."""
    try:
        return sock.recv(size)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def error_reply(error: str, message: str, **extra: Any) -> Message:
    """The reply that makes a client raise the `bgpool.errors` class named
    `error` with `message` (and `extra` fields, such as diagnostics)."""
    return {"ok": False, "error": error, "message": message, **extra}


class ProtocolError(Exception):
    """A peer sent something that is not a well-formed message; drop the peer."""


def encode(message: Message) -> bytes:
    """One frame: a 4-byte big-endian length, then the message as UTF-8 JSON."""
    data = json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
    if len(data) > MAX_FRAME:
        raise ValueError(f"message of {len(data)} bytes exceeds the {MAX_FRAME}-byte frame limit")
    return _LENGTH.pack(len(data)) + data


def _decode(data: bytes) -> Message:
    try:
        message = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"malformed message: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a JSON object")
    return message


class FrameDecoder:
    """Incremental decoder for a non-blocking stream."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        """Add received bytes; return every message now complete."""
        self._buffer += data
        messages = []
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > MAX_FRAME:
                raise ProtocolError(f"frame of {length} bytes exceeds the limit")
            end = _LENGTH.size + length
            if len(self._buffer) < end:
                break
            messages.append(_decode(bytes(self._buffer[_LENGTH.size : end])))
            del self._buffer[:end]
        return messages


class FrameReader:
    """Reads exactly one frame, whatever does the reading (a blocking socket, an
    event loop's): `needed` is how many bytes to read next, never past the
    frame's end (on a subscription, events follow the reply), and `feed()`
    takes them and returns the message once it is whole."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._size = _LENGTH.size
        self._header = True

    @property
    def needed(self) -> int:
        """Bytes still missing from the header or the body."""
        return self._size - len(self._buffer)

    def feed(self, data: bytes) -> Message | None:
        """Add received bytes (`b""`, the peer's EOF, is a `ConnectionError`);
        the message once complete, else None."""
        if not data:
            raise ConnectionError("the supervisor closed the connection")
        self._buffer += data
        if self._header and len(self._buffer) == self._size:
            (length,) = _LENGTH.unpack(self._buffer)
            if length > MAX_FRAME:
                raise ProtocolError(f"frame of {length} bytes exceeds the limit")
            self._header, self._size = False, length
            self._buffer.clear()
        if self._header or len(self._buffer) < self._size:
            return None
        return _decode(bytes(self._buffer))


def request(sock: socket.socket, message: Message) -> Message:
    """Send one message on a blocking socket and wait for the one reply."""
    sock.sendall(encode(message))
    return receive(sock)


def receive(sock: socket.socket) -> Message:
    """Read one message from a blocking socket."""
    reader = FrameReader()
    while (message := reader.feed(sock.recv(reader.needed))) is None:
        pass
    return message
