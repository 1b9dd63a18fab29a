"""Teardown: what the supervisor does once its loop ended, or failed, so that
nothing is left behind: no process, no zombie, no shared-memory segment, no
socket file or directory.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
from collections.abc import Callable

from .. import platform
from ..shm import varstore
from ..shm.table import Status
from .core import guarded
from .drains import FORCE_KILL_DELAY
from .listener import Connection
from .requests import Requests


class Teardown(Requests):
    """Killing what is left and releasing everything the supervisor holds."""

    def kill_everything(self) -> None:
        """Last resort when the loop failed: SIGKILL every worker tree."""
        for pid in list(self.by_pid):
            self._signal_tree(pid, signal.SIGKILL)

    def close(self) -> None:
        """Reap what is left (orphans included), close every socket and remove
        the table, the socket file and its directory. Each step runs even if an
        earlier one failed: nothing may be left behind."""
        steps: list[Callable[[], None]] = [
            *(gen.close for gen in self.generations),  # each exits at EOF, the seed too
            *([self.seed.close] if self.seed is not None else []),
            self.close_coordinator,  # its releases sent: every worker has exited
            self._reap_leftovers,
            self.close_file_watch,
            self.relay.close,
            self._close_connections,
            self.selector.close,
            self.listener.close,
            functools.partial(varstore.remove_all, self.table.name),
            functools.partial(self.table.set_status, Status.CLOSED),
            self.table.destroy,
            self._stop_wakeups,
            *(functools.partial(os.close, fd) for fd in (self.wake_r, self.wake_w)),
        ]
        if self.owner_fd is not None:
            steps.append(functools.partial(os.close, self.owner_fd))
        for step in steps:
            guarded(step)

    def _stop_wakeups(self) -> None:
        """Signals stop writing to the loop's wake-up pipe, which closes next: a
        late one must not write its byte into a closed (or reused) descriptor."""
        signal.set_wakeup_fd(-1)

    def _reap_leftovers(self) -> None:
        """SIGTERM, then SIGKILL, whatever descendants are left: orphans that
        workers left behind were re-parented to us (we are their subreaper)."""
        leftovers = platform.process_tree(self.pid)[1:]
        platform.signal_tree(leftovers, signal.SIGTERM)
        alive = platform.wait_gone(leftovers, FORCE_KILL_DELAY)
        platform.signal_tree(alive, signal.SIGKILL)
        platform.wait_gone(alive, FORCE_KILL_DELAY)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass

    def _close_connections(self) -> None:
        for key in list(self.selector.get_map().values()):
            if isinstance(key.data, Connection):
                key.data.close()
