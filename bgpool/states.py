"""The lifecycle states of a worker instance, as every process sees them.

The supervisor moves an instance between them (see `TRANSITIONS`); the
readiness table publishes them; clients, metrics and the CLI read them.
"""

from __future__ import annotations

import enum


class State(enum.IntEnum):
    """The lifecycle state of one worker instance."""

    STOPPED = 0  # not running and not scheduled (lazy, drained, or never started)
    STARTING = 1  # process spawned, handle not taken in this run
    READY = 2  # handle taken in this run
    BACKOFF = 3  # exited; waiting before the next start
    CRASHED = 4  # exited abnormally; restart due now
    ABORTED = 5  # given up after max_consecutive_failures boot failures
    STOPPING = 6  # drain in progress

    @property
    def label(self) -> str:
        """The state as users see it: `"ready"`, `"backoff"`, ..."""
        return self.name.lower()
