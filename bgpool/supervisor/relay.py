"""Worker output, relayed by the supervisor a whole line at a time, prefixed with
the worker's label (`job-runner.0 | ...`, as foreman and honcho do).

Runs in the supervisor's loop. Each worker's stdout and stderr are pipes; the
relay reads them without blocking, cuts complete lines, and queues them for the
supervisor's own stdout or stderr. Writes happen only when the destination is
writable and are at most `PIPE_BUF` bytes of whole lines, so a line is never
split by another writer and a slow terminal never blocks the loop. When a
destination falls behind, the relay stops reading the workers that feed it, so
a flooding worker blocks in its own `write()` (as it would on a slow terminal)
while the supervisor goes on serving everyone else.

Each line cut is also told to its instance's recorder, which keeps it for
diagnostics and `logs()` (`logs.py`).
"""

from __future__ import annotations

import collections
import errno
import os
import select
import selectors
import time
from collections.abc import Callable

from .. import texts

TAIL_LINES = 20
"""How many of a worker's last output lines diagnostics keep."""

TAIL_LINE_CHARS = 1000
"""How much of each such line they keep: replies carry them, and must fit a frame."""

MAX_LINE = 16384
"""A longer line is relayed in pieces of this size."""

HIGH_WATER = 256 * 1024
"""Queued bytes for one destination past which its sources stop being read."""

LOG_LIMIT = 4 * 1024 * 1024
"""Queued bytes past which the supervisor's own log lines are dropped (counted):
they cannot be held back like a worker's pipe."""

CHUNK = select.PIPE_BUF

COLOURS = (36, 33, 32, 35, 31, 34, 96, 93, 92, 95, 91, 94)
"""The SGR colours of worker labels, in the order honcho hands them out: cyan,
yellow, green, magenta, red, blue, then their bright forms."""

FINAL_FLUSH = 1.0
"""Seconds the exiting supervisor waits for its stdout/stderr to take what is
still queued."""


class _Destination:
    """The supervisor's stdout or stderr and what is queued for it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.queue: collections.deque[bytes] = collections.deque()
        self.queued = 0
        self.pollable = True
        self.broken = False


Recorder = Callable[[int, str], None]
"""What the relay tells of each line it cuts: its stream (1 or 2) and its text."""


class _Source:
    """One worker pipe (its stdout or its stderr)."""

    def __init__(
        self,
        fd: int,
        stream: int,
        prefix: bytes,
        destination: _Destination,
        tail: collections.deque[str],
        record: Recorder,
    ) -> None:
        self.fd = fd
        self.stream = stream
        self.prefix = prefix
        self.destination = destination
        self.tail = tail
        self.record = record
        self.partial = b""
        self.paused = False


class Relay:
    """All worker output of one supervisor."""

    def __init__(self, selector: selectors.BaseSelector, stdout: int = 1, stderr: int = 2) -> None:
        self._selector = selector
        self._destinations = {1: _Destination(stdout), 2: _Destination(stderr)}
        self._sources: dict[int, _Source] = {}
        self._dropped = 0
        self._closed = False
        self._colours: dict[str, int] | None = None  # a colour per worker, when coloured
        self._timestamps = False

    def decorate(self, colour: bool, timestamps: bool) -> None:
        """Colour each worker's label (one colour per worker, in the order they
        first speak, as honcho does), and prefix each line with the time it
        was read: what `bgpool run` asks for on a terminal, and with
        `--timestamps`."""
        self._colours = {} if colour else None
        self._timestamps = timestamps

    def attach(
        self,
        fd: int,
        stream: int,
        label: str,
        tail: collections.deque[str],
        record: Recorder,
    ) -> None:
        """Relay pipe `fd` (the read end of a worker's stream 1 or 2); keep the
        last lines in `tail` (for diagnostics) and tell `record` of each."""
        os.set_blocking(fd, False)
        prefix = f"{label} | ".encode()
        if self._colours is not None:
            worker = label.rpartition(".")[0]  # the label without its instance index
            colour = self._colours.setdefault(worker, len(self._colours) % len(COLOURS))
            prefix = f"\x1b[{COLOURS[colour]}m{label} |\x1b[0m ".encode()
        source = _Source(fd, stream, prefix, self._destinations[stream], tail, record)
        self._sources[fd] = source
        self._selector.register(fd, selectors.EVENT_READ, self._reader(source))

    def write_log(self, line: str) -> None:
        """Queue one of the supervisor's own log lines for stderr, never blocking:
        past `LOG_LIMIT` queued bytes, lines are dropped and counted instead."""
        destination = self._destinations[2]
        if destination.queued > LOG_LIMIT:
            self._dropped += 1
            return
        if self._dropped:
            note = f"bgpool: {self._dropped} log lines dropped (stderr was not read)\n"
            self._dropped = 0
            self._queue(destination, note.encode())
        self._queue(destination, line.encode(errors="replace") + b"\n")

    def _reader(self, source: _Source) -> Callable[[object], None]:
        def read(_fd: object) -> None:
            self._read(source)

        return read

    def drain(self, fd: int) -> None:
        """Read what a worker left in pipe `fd` (called when it exits, so its
        last lines reach the diagnostics before the exit is judged)."""
        source = self._sources.get(fd)
        while source is not None and fd in self._sources and self._read(source):
            pass

    def _read(self, source: _Source) -> bool:
        """Read one chunk; return whether more may follow."""
        try:
            data = os.read(source.fd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._line(source, source.partial, final=True)
            self._detach(source)
            return False
        data = source.partial + data
        *lines, source.partial = data.split(b"\n")
        for line in lines:
            self._line(source, line)
        while len(source.partial) > MAX_LINE:
            self._line(source, source.partial[:MAX_LINE])
            source.partial = source.partial[MAX_LINE:]
        self._pace(source.destination)
        return True

    def _line(self, source: _Source, line: bytes, final: bool = False) -> None:
        if final and not line:
            return
        text = line.decode(errors="replace")
        source.tail.append(texts.clip(text, TAIL_LINE_CHARS))
        source.record(source.stream, text)
        prefix = source.prefix
        if self._timestamps:
            prefix = time.strftime("%H:%M:%S ").encode() + prefix
        self._queue(source.destination, prefix + line + b"\n")

    def _queue(self, destination: _Destination, data: bytes) -> None:
        if destination.broken:
            return
        destination.queue.append(data)
        destination.queued += len(data)
        self._flush(destination)

    def _flush(self, destination: _Destination) -> None:
        """Write whole lines while the destination takes them without blocking."""
        while destination.queue:
            if destination.pollable and not _writable(destination.fd):
                break
            chunk = _take(destination.queue, CHUNK)
            try:
                written = os.write(destination.fd, chunk)
            except BlockingIOError:
                written = 0
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.EBADF, errno.EIO):
                    destination.broken = True  # nobody reads it: drop output from now on
                    destination.queue.clear()
                    destination.queued = 0
                    break
                raise
            destination.queued -= written
            if written < len(chunk):
                destination.queue.appendleft(chunk[written:])
                break
        self._wait_writable(destination)
        self._pace(destination)

    def _wait_writable(self, destination: _Destination) -> None:
        if self._closed:
            return
        key = self._selector.get_map().get(destination.fd)
        if destination.queue and key is None and destination.pollable:
            try:
                self._selector.register(
                    destination.fd, selectors.EVENT_WRITE, lambda _fd: self._flush(destination)
                )
            except (PermissionError, ValueError):
                destination.pollable = False  # a regular file: always writable
        elif not destination.queue and key is not None:
            self._selector.unregister(destination.fd)

    def _pace(self, destination: _Destination) -> None:
        """Stop reading the sources of a destination that fell behind; resume
        them once it caught up."""
        behind = destination.queued > HIGH_WATER
        for source in self._sources.values():
            if source.destination is destination and source.paused != behind:
                source.paused = behind
                if behind:
                    self._selector.unregister(source.fd)
                else:
                    self._selector.register(source.fd, selectors.EVENT_READ, self._reader(source))

    def _detach(self, source: _Source) -> None:
        del self._sources[source.fd]
        if not source.paused:
            self._selector.unregister(source.fd)
        os.close(source.fd)

    def close(self, patience: float = FINAL_FLUSH) -> None:
        """Close every worker pipe and relay what is queued, waiting at most
        `patience` seconds for a destination nobody reads (the supervisor is
        exiting: it must not hang on it). What did not fit is dropped."""
        for source in list(self._sources.values()):
            self._line(source, source.partial, final=True)
            self._detach(source)
        for destination in self._destinations.values():
            if self._selector.get_map().get(destination.fd) is not None:
                self._selector.unregister(destination.fd)
        self._closed = True
        deadline = time.monotonic() + patience
        for destination in self._destinations.values():
            while destination.queue and not destination.broken:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if destination.pollable:
                    poller = select.poll()
                    poller.register(destination.fd, select.POLLOUT)
                    poller.poll(remaining * 1000)
                self._flush(destination)


def _writable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return bool(poller.poll(0))


def _take(queue: collections.deque[bytes], limit: int) -> bytes:
    """Up to `limit` bytes of whole queued lines; a longer line goes in pieces
    (a write of at most PIPE_BUF bytes to a pipe that polls writable does not
    block and is not interleaved with other writers)."""
    first = queue.popleft()
    if len(first) > limit:
        queue.appendleft(first[limit:])
        return first[:limit]
    parts = [first]
    size = len(first)
    while queue and size + len(queue[0]) <= limit:
        size += len(queue[0])
        parts.append(queue.popleft())
    return b"".join(parts)
