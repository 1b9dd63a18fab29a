"""Worker logs: the last `PoolConfig.log_lines` relayed lines of every worker
name, and the clients that follow them (`logs()`, `bgpool logs -f`).

Runs in the supervisor's loop. The relay (`relay.py`) hands each line it cuts
to the instance's recorder (`Lifecycle._logged`), which keeps it in its
worker's ring (`Worker.logs`) and sends it to that name's followers: what the
`watch` op is to state changes, a follower is to one name's lines. Memory is
bounded twice: a ring holds at most `log_lines` entries of at most
`LINE_CHARS` characters each, and a follower's unsent backlog at most
`FOLLOW_BACKLOG` bytes; past it, lines are dropped for that follower alone and
it is told how many once it caught up. A slow reader never slows the relay
(whose pacing is for the supervisor's own stdout and stderr only).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from itertools import islice

from ..protocol import Message
from .listener import Connection

LINE_CHARS = 2000
"""How much of a relayed line a log entry keeps (what is cut is counted in its
text); the terminal output has the whole line."""

BATCH = 128
"""Entries per reply frame: 128 of the longest entries, JSON-escaped at 12
bytes a character, fit a frame (4 MiB)."""

FOLLOW_BACKLOG = 1 << 20
"""Queued bytes for one follower past which its new lines are dropped."""

STREAMS = {1: "stdout", 2: "stderr"}

Entry = tuple[float, int, int, str]
"""One kept line: wall-clock time, stream (1 or 2), instance index, text."""


def ring(limit: int, entries: Iterable[Entry] = ()) -> collections.deque[Entry]:
    """A worker's ring of at most `limit` entries (the newest of `entries`)."""
    return collections.deque(entries, maxlen=limit)


def last(entries: collections.deque[Entry], count: int) -> list[Entry]:
    """The newest `count` entries of a ring, oldest first."""
    return list(islice(entries, max(0, len(entries) - count), None)) if count else []


def _data(entry: Entry) -> list[object]:
    when, stream, instance, text = entry
    return [when, STREAMS[stream], instance, text]


def replies(entries: list[Entry]) -> Iterator[Message]:
    """The answer to a `logs` request: `entries` in frames of at most `BATCH`,
    each saying whether more follow (one empty frame when there are none)."""
    for start in range(0, max(len(entries), 1), BATCH):
        chunk = entries[start : start + BATCH]
        yield {
            "ok": True,
            "lines": [_data(e) for e in chunk],
            "more": start + BATCH < len(entries),
        }


class Follower:
    """A connection following one worker name's new lines."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.dropped = 0  # lines not sent since the last notice, the backlog being full
        conn.on_flushed = self._caught_up

    def send(self, entry: Entry) -> None:
        """Send one new line, or drop it (counted) while the backlog is full."""
        if self.conn.pending > FOLLOW_BACKLOG:
            self.dropped += 1
            return
        self._caught_up()
        self.conn.send({"event": "log", "line": _data(entry)})

    def _caught_up(self) -> None:
        """Tell the follower how many lines it missed, once there is room."""
        if self.dropped and self.conn.pending <= FOLLOW_BACKLOG:
            dropped, self.dropped = self.dropped, 0
            self.conn.send({"event": "dropped", "count": dropped})
