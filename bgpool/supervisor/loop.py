"""The supervisor process: one thread, one event loop, every state transition.

Data flow::

    application processes            supervisor (this module)              workers
    Pool / PoolClient  ── control socket: JSON requests ──▶  run()
          ▲                                   │ fork ─▶ code generation ─▶ worker.run_forked()
          │                                   │   (forks workers as the supervisor's children)
          │                                   │ stop pipe: close = drain ──▶ handle EOF
          │                                   ◀── notify pipe: ready, error ─┘
          │                                   ◀── SIGCHLD via wake-up pipe (exits, reaped at once)
          └── reads ── readiness table (shared memory) ◀── writes (seqlock) ─┘

The loop blocks in `select()` on the listener, the client connections, every
worker's notify pipe, the signal wake-up pipe and the owner's pidfd, with a
timeout computed from the next timer (restart backoff, ensure deadlines, drain
stages), so an idle supervisor uses no CPU. Signal handlers only write a byte to
the wake-up pipe; all logic happens in the loop.

The supervisor imports no user code. Workers are forked by code generations:
child processes that import the targets' modules (one generation per restart
or reload, so edited code runs; crash restarts keep their instance's own),
and fork each worker as the supervisor's child. `generations.py` says why a
generation is a process rather than a supervisor that re-executes itself.

Where each job lives (one layer per module, each using those below it):

    core.py       shared state, `_transition()` (checked against states.TRANSITIONS), waiters
    drains.py     stop pipe closed, grace period, SIGTERM, SIGKILL; shutdown (dependants first)
    lifecycle.py  spawn, readiness, exits, restart/backoff/abort decisions, catch-all
                  hosting, the code generations workers fork from (generations.py)
    requirements.py  fresh starts held back until what they require is ready
    rollouts.py   restarts on new code: load a generation, replace instances, rolling
    policies.py   boot_timeout and heartbeat_timeout: a run's deadlines, the kill of one that misses
    recycling.py  recycles for max_memory (the memory sampler) and max_lifetime, rolling
    reloads.py    reload(config): declarations added, removed, changed, kept (slots.py)
    control.py    stop(), start_workers(), scale(): one worker, on an operator's request
    watches.py    file watch: a change restarts its worker on new code (watch.py)
    leases.py     singletons: leases held through a coordinator process (coordination.py),
                  standby, the timers that kill a worker at its lease's deadline
    requests.py   control requests, dispatched by operation name (`HANDLERS`)
    teardown.py   kill and release everything once the loop ends
    loop.py       this module: setup, signals, the owner's death, the loop itself

Nothing here is imported by worker-side or application-side code.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket

from .. import platform
from ..naming import NameLock
from .core import Settings, guarded
from .generations import Generation
from .listener import Connection
from .registry import Decl
from .teardown import Teardown

__all__ = ["Settings", "Supervisor"]


IDLE_BEFORE_PRELOAD = 0.05
"""Seconds without an event or timer after which the loop preloads psutil."""


class Supervisor(Teardown):
    """The event loop over every job of the supervisor."""

    def __init__(
        self,
        decls: list[Decl],
        settings: Settings,
        owner_pid: int,
        address: str,
        table: str,
        seed: socket.socket | None = None,
        first: Generation | None = None,
        lock: NameLock | None = None,
    ) -> None:
        super().__init__(decls, settings, address, table, seed, first, lock)
        self._watch_owner(owner_pid)
        self.selector.register(self.listener.sock, selectors.EVENT_READ, self._accept)
        self.selector.register(self.wake_r, selectors.EVENT_READ, self._on_wake)

    def _watch_owner(self, owner_pid: int) -> None:
        """Drain everything when the application process that owns the pool dies."""
        try:
            self.owner_fd = platform.pidfd_open(owner_pid)
        except OSError:
            self.owner_fd = None
        if self.owner_fd is None or os.getppid() != owner_pid:
            self.timers.call_later(0, lambda: self._shutdown("the application process is gone"))
            return
        self.selector.register(self.owner_fd, selectors.EVENT_READ, self._on_owner_exit)

    def install_signals(self) -> None:
        """Route SIGCHLD, SIGTERM, SIGINT, SIGHUP and SIGQUIT into the loop's
        wake-up pipe."""
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, lambda *_: None)

    def run(self) -> None:
        """Serve until shut down: wait on descriptors and timers, dispatch.
        The first time nothing happened for `IDLE_BEFORE_PRELOAD` seconds, load
        what only a drain needs (`platform.preload`), so that neither the
        pool's start nor its drain waits for that import (again at the next
        such time if it found no free descriptor)."""
        preloaded = False
        while not self.finished:
            timeout = self.timers.next_timeout()
            if not preloaded and (timeout is None or timeout > IDLE_BEFORE_PRELOAD):
                timeout = IDLE_BEFORE_PRELOAD
            ready = self.selector.select(timeout)
            if not ready and not preloaded and timeout == IDLE_BEFORE_PRELOAD:
                preloaded = platform.preload()
            for key, events in ready:
                # An earlier handler in this batch may have closed this descriptor
                # (a worker's exit closes its notify pipe): skip stale events.
                if self.selector.get_map().get(key.fd) is not key:
                    continue
                guarded(self._dispatch_event, key, events)
            self.timers.run_due(guarded)

    def _dispatch_event(self, key: selectors.SelectorKey, events: int) -> None:
        if isinstance(key.data, Connection):
            self._on_connection(key.data, events)
        else:
            key.data(key.fileobj)

    def _on_wake(self, _fd: object) -> None:
        """Handle the signals that arrived since the last wake-up."""
        try:
            data = os.read(self.wake_r, 512)
        except BlockingIOError:
            return
        received = set(data)
        if signal.SIGCHLD in received:
            self._reap()
        if received & {signal.SIGTERM, signal.SIGINT}:
            self._shutdown("asked to stop")
        if signal.SIGQUIT in received:  # a second SIGTERM could be a service manager's own
            self._skip_grace()
        if signal.SIGHUP in received:  # what restart_workers() does
            self._roll(list(self.workers.values()), self._answer_conn(None))

    def _on_owner_exit(self, _fd: object) -> None:
        self._shutdown("the application process exited")
