"""Restart policy: pure functions from a worker's history to the supervisor's next
step. No I/O and no clock of their own, so every case is cheap to test.
"""

from __future__ import annotations

import math

MAX_BACKOFF = 1.0
"""The longest wait between two restarts, in seconds."""

STABLE_RUN = 10.0
"""A run at least this long (seconds) resets the consecutive-failure count."""

CLEAN_EXIT_INTERVAL = 0.1
"""Shortest time between two starts of one instance after clean exits: at most
10 restarts a second, so a target that returns at once cannot spin a core."""


def backoff_delay(failures: int) -> float:
    """Seconds to wait before restarting after the `failures`-th failure in a row.

    Quadratic, capped at one second: 0, 0.1, 0.4, 0.9, 1.0, 1.0, ... The first
    restart is immediate so a one-off crash costs no latency.
    """
    if failures <= 1:
        return 0.0
    return min(MAX_BACKOFF, 0.1 * (failures - 1) ** 2)


def should_abort(failures: int, ever_ready: bool, max_failures: int) -> bool:
    """Whether an instance is given up: only while it has never been ready, once
    `failures` consecutive boot failures reach the cap (-1 never gives up)."""
    return not ever_ready and max_failures != -1 and failures >= max_failures


def count_failures(previous: int, *, failed: bool, run_seconds: float) -> int:
    """The consecutive-failure count after an exit: a run that lasted
    `STABLE_RUN` seconds or more starts the count afresh."""
    base = 0 if run_seconds >= STABLE_RUN else previous
    return base + 1 if failed else base


def restart_delay(*, failed: bool, failures: int, since_last_start: float) -> float:
    """Seconds to wait before the next start after an exit outside a drain.

    A failure backs off by `failures` (which counts it); a clean exit after
    readiness is only paced to `CLEAN_EXIT_INTERVAL` between starts.
    """
    if failed:
        return backoff_delay(failures)
    return max(0.0, CLEAN_EXIT_INTERVAL - since_last_start)


def restarts_exhausted(crashes: int, max_restarts: int | None) -> bool:
    """Whether an instance that was ready is aborted for its restart intensity
    (OTP's): more than `max_restarts` crashes within the window (None: never)."""
    return max_restarts is not None and crashes > max_restarts


BEATS_PER_TIMEOUT = 3
"""Heartbeats a worker sends at most per `heartbeat_timeout` (`heartbeat()`
calls in between send nothing), so a worker that calls it in a tight loop
costs the supervisor three wake-ups per timeout, and one whose calls are
spaced under the timeout always has one counted within it."""


def beat_interval(heartbeat_timeout: float) -> float:
    """The shortest time between two heartbeats a worker sends."""
    return heartbeat_timeout / BEATS_PER_TIMEOUT


CHECKS_PER_TIMEOUT = 4
"""Heartbeat deadlines are checked on a grid of `heartbeat_timeout / 4`
(seconds of the monotonic clock), so every run with the same timeout is
checked in the same wake-up of the loop: a hang is found between 1 and 1.25
timeouts after the last heartbeat."""


def beat_check_time(due: float, heartbeat_timeout: float) -> float:
    """When a run whose heartbeat deadline is `due` is checked: the first
    point of its timeout's grid at or after it."""
    step = heartbeat_timeout / CHECKS_PER_TIMEOUT
    return math.ceil(due / step) * step


def lifetime(max_lifetime: float, jitter: float, draw: float) -> float:
    """An instance's lifetime: `max_lifetime * (1 + u)` with `u = jitter *
    draw`, `draw` uniform in [0, 1] (the caller's), so a pool's instances,
    started together, do not all come due at once."""
    return max_lifetime * (1 + jitter * draw)


SAMPLE_COST = 0.02
"""Seconds between memory samples per sampled instance: one pass reads a few
/proc files per process (tens of microseconds), so sampling costs about 0.2%
of a core however many instances set `max_memory`."""

SAMPLE_BOUNDS = (1.0, 5.0)
"""The shortest and longest time between two memory samples (SPEC: at least
every 5 s)."""


def sampling_interval(instances: int) -> float:
    """Seconds between two memory samples of `instances` running instances."""
    shortest, longest = SAMPLE_BOUNDS
    return min(longest, max(shortest, SAMPLE_COST * instances))
