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


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("the supervisor closed the connection")
        chunks += chunk
    return bytes(chunks)


def request(sock: socket.socket, message: Message) -> Message:
    """Send one message on a blocking socket and wait for the one reply."""
    sock.sendall(encode(message))
    return receive(sock)


def receive(sock: socket.socket) -> Message:
    """Read one message from a blocking socket."""
    (length,) = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size))
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes exceeds the limit")
    return _decode(_recv_exactly(sock, length))
