"""A self-pipe for signals, for a command that waits in a selector."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator


@contextlib.contextmanager
def signal_wakeup() -> Iterator[tuple[int, int]]:
    """A pipe (read end, write end) that the interpreter's C-level handler
    writes each caught signal's number to, set as the wakeup fd while the
    block runs. A selector that waits on the read end wakes for a signal
    even when it arrives just before the select call: Python runs a
    signal's handler (a KeyboardInterrupt too) only between bytecodes, so
    without the pipe that select would block on until something else came."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    previous = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    try:
        yield wake_r, wake_w
    finally:
        signal.set_wakeup_fd(previous)
        os.close(wake_r)
        os.close(wake_w)
