"""The supervisor's own log: bgpool's format, every line cut to a length, and
where records go (stderr until the loop's relay takes over).

Imported by the supervisor's entry point only once it has forked the seed
(`main.py`): logging imports threading, and the seed must hold neither.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .. import texts

if TYPE_CHECKING:
    from .relay import Relay

log = logging.getLogger("bgpool")


_LOG_FORMAT = "bgpool[%(process)d] %(levelname)s %(message)s"

LOG_LINE_CHARS = 2000
"""The longest log line the supervisor writes: a worker's 10 kB exception
message is cut, saying how much was left out."""


class _Formatter(logging.Formatter):
    """bgpool's log format, every record cut to `LOG_LINE_CHARS`."""

    def __init__(self) -> None:
        super().__init__(_LOG_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return texts.clip(super().format(record), LOG_LINE_CHARS)


class _RelayHandler(logging.Handler):
    """Log records through the output relay, so logging never blocks the loop
    on a stderr nobody reads (the relay queues and writes when it can)."""

    def __init__(self, relay: Relay) -> None:
        super().__init__()
        self._relay = relay
        self.setFormatter(_Formatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._relay.write_log(self.format(record))
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def logging_to_stderr(level: str) -> Iterator[None]:
    """Plain stderr logging until the loop's relay takes over (`relay_logging`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    try:
        yield
    finally:
        for other in list(log.handlers):
            log.removeHandler(other)


def relay_logging(relay: Relay) -> None:
    """Log through the relay from now on (`_RelayHandler`)."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
    log.addHandler(_RelayHandler(relay))
