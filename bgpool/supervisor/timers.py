"""One-shot timers for a single-threaded event loop, on a monotonic clock.

The loop asks `next_timeout()` how long it may block in `select()` and calls
`run_due()` afterwards, so an idle supervisor sleeps until its next deadline
instead of polling.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable

MAX_WAIT = 3600.0
"""The longest the loop blocks at once: a far deadline (an ensure() timeout of
1e300 s) must not overflow the poll call's timeout."""


def _call(callback: Callable[[], None]) -> None:
    callback()


class Timer:
    """A scheduled call; `cancel()` it to drop it."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        """Make sure the callback does not run."""
        self.cancelled = True


class Timers:
    """A heap of timers."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._heap: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        """Run `callback` once `clock()` reaches `when`."""
        timer = Timer(when, callback)
        heapq.heappush(self._heap, (when, next(self._order), timer))
        return timer

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Run `callback` after `delay` seconds."""
        return self.call_at(self.clock() + delay, callback)

    def next_timeout(self) -> float | None:
        """Seconds until the earliest live timer (0 if due), None if there is none."""
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)
        if not self._heap:
            return None
        return min(MAX_WAIT, max(0.0, self._heap[0][0] - self.clock()))

    def run_due(self, run: Callable[[Callable[[], None]], None] = _call) -> None:
        """Run every timer that is due, earliest first, each through `run` (the
        supervisor passes one that logs a failing callback instead of dying)."""
        now = self.clock()
        while self._heap and self._heap[0][0] <= now:
            _, _, timer = heapq.heappop(self._heap)
            if not timer.cancelled:
                timer.cancelled = True
                run(timer.callback)
