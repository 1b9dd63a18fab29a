"""The API a worker uses from inside its own process: `get_worker_handle()`
and `set_vars()` (`current_worker()` is `bgpool.identity`'s).

Knows nothing of the supervisor beyond what it was given: the read end of its
stop pipe (EOF means "stop"), the write end of its notify pipe (where it reports
readiness, publications and, on a crash, its exception), and the name of its
vars segment.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import select
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import protocol
from ..shm import snapshot
from ..shm.varstore import Publisher

if TYPE_CHECKING:
    import asyncio  # imported where used: a sync worker need not pay for it


@dataclass(frozen=True)
class Context:
    """What the runtime hands the worker API: its pipe ends and vars segment."""

    stop_fd: int
    notify_fd: int
    vars_segment: str
    max_vars_bytes: int
    heartbeat_interval: float | None = None  # the shortest time between two sent heartbeats


_context: Context | None = None
_handle: WorkerHandle | None = None
_publisher: Publisher | None = None
_announced = False  # whether this run told the supervisor it published
# _thread's locks, which threading.Lock is: every process forked from one
# that imported threading runs its after-fork hook, and the seed workers are
# forked from imports only what workers need (`zygote.seed`)
_lock = _thread.allocate_lock()
_write_lock = _thread.allocate_lock()  # one report at a time on the notify pipe, whole
_READY = protocol.encode({"t": "ready"})
"""The readiness report, encoded once by the generation workers fork from:
encoding it in each worker made it keep 60 KiB more of its own on 3.11."""


class WorkerHandle:
    """The stop signal of a running worker.

    `fileno()` becomes readable (at EOF) when the supervisor asks the worker to
    stop, so it works with `select`, `selectors` and asyncio's `add_reader`
    (which `wait_async()` uses).
    """

    def __init__(self, fd: int, heartbeat_interval: float | None = None) -> None:
        self._fd = fd
        self._interval = heartbeat_interval
        self._next_beat = 0.0  # monotonic time from which heartbeat() sends one
        self._stopped = False
        self._stopping: asyncio.Future[None] | None = None  # what wait_async() awaits

    def fileno(self) -> int:
        """The stop pipe's read end; readable once a stop was requested."""
        return self._fd

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a stop is requested or `timeout` seconds pass; return
        whether a stop was requested."""
        if not self._stopped:
            poller = select.poll()
            poller.register(self._fd, select.POLLIN)
            self._stopped = bool(poller.poll(None if timeout is None else timeout * 1000))
        return self._stopped

    async def wait_async(self, timeout: float | None = None) -> bool:
        """`wait()` for an async target: await a stop request, or `timeout`
        seconds; return whether a stop was requested. The event loop watches
        the stop pipe (`add_reader`): no thread, and the loop runs on."""
        import asyncio

        if self.wait(0):
            return True
        stopping = self._stop_future(asyncio.get_running_loop())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                # shielded: a waiter that times out or is cancelled leaves the
                # future to the others
                await asyncio.shield(stopping)
        return self.wait(0)

    def _stop_future(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """The future every `wait_async()` on `loop` awaits, done at the stop
        pipe's EOF (one reader per loop: `add_reader` keeps one per fd)."""
        stopping = self._stopping
        if stopping is None or stopping.get_loop() is not loop:
            stopping = self._stopping = loop.create_future()

            def readable() -> None:
                loop.remove_reader(self._fd)
                if not stopping.done():
                    stopping.set_result(None)

            loop.add_reader(self._fd, readable)
        return stopping

    def heartbeat(self) -> None:
        """Tell the supervisor this worker is alive (`WorkerSpec.heartbeat_timeout`:
        one that goes longer without calling it, or `tick()`, is killed as
        hung). Cheap enough for a tight loop: at most a few per timeout are
        sent (one small write each, which the supervisor reads only when its
        deadline comes), the other calls cost a clock read; without a
        heartbeat_timeout nothing is sent."""
        interval = self._interval
        if interval is None:
            return
        now = time.monotonic()
        if now >= self._next_beat:
            self._next_beat = now + interval
            # when: the supervisor reads beats only at its deadline (CLOCK_MONOTONIC
            # is the same clock in every process of the machine)
            _send(protocol.encode({"t": "beat", "at": now}))

    def tick(self, timeout: float | None = None) -> bool:
        """Heartbeat, then wait up to `timeout` seconds for a stop request;
        return True to go on working, False once a stop was requested:
        `while handle.tick(1.0): work()`. The wait heartbeats as it goes, so
        time spent in `tick()` never counts as hung, however long `timeout`."""
        self.heartbeat()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = self._step(deadline)
            if self.wait(step):
                return False
            self.heartbeat()
            if deadline is not None and time.monotonic() >= deadline:
                return True

    async def tick_async(self, timeout: float | None = None) -> bool:
        """`tick()` for an async target: heartbeat, then await a stop request
        for up to `timeout` seconds (heartbeating as it waits); False once a
        stop was requested."""
        self.heartbeat()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = self._step(deadline)
            if await self.wait_async(step):
                return False
            self.heartbeat()
            if deadline is not None and time.monotonic() >= deadline:
                return True

    def _step(self, deadline: float | None) -> float | None:
        """How long one wait of `tick()` lasts: until `deadline`, but no
        longer than the heartbeat interval (None: no bound)."""
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if self._interval is None:
            return remaining
        return self._interval if remaining is None else min(remaining, self._interval)

    @property
    def stop_requested(self) -> bool:
        """Whether the supervisor asked this worker to stop (never blocks)."""
        return self.wait(0)


def get_worker_handle() -> WorkerHandle:
    """Return this worker's stop handle; the first call marks the worker ready.

    Raises `RuntimeError` outside a bgpool worker process.
    """
    global _handle
    if _context is None:
        raise RuntimeError("get_worker_handle() can only be called inside a bgpool worker")
    with _lock:
        if _handle is None:
            _handle = WorkerHandle(_context.stop_fd, _context.heartbeat_interval)
            _send(_READY)
        return _handle


def set_vars(mapping: Mapping[str, object]) -> None:
    """Publish `mapping` as this worker name's vars snapshot.

    Every process of the application sees it (`get_vars()`) once this returns.
    Values: None, bool, int, float, str, bytes, lists, tuples and str-keyed
    dicts, nested; anything else raises `TypeError` naming where it was found,
    and nothing is published. Larger than `PoolConfig.max_vars_bytes` once
    encoded, or nested more than 2,000 containers deep: `ValueError`. Identical
    to the current snapshot: nothing changes.
    Outside a worker: `RuntimeError`.
    """
    global _publisher, _announced
    if _context is None:
        raise RuntimeError("set_vars() can only be called inside a bgpool worker")
    data = snapshot.encode(mapping)
    if len(data) > _context.max_vars_bytes:
        raise ValueError(
            f"vars snapshot is {len(data)} bytes encoded, over max_vars_bytes "
            f"({_context.max_vars_bytes})"
        )
    with _lock:
        if _publisher is None:
            _publisher = Publisher(_context.vars_segment, _context.max_vars_bytes)
        _publisher.publish(data)
        if not _announced:
            # The supervisor hears of the first publication of each run, even one
            # that changed nothing: with ready_on="vars" it makes the run ready.
            # Later ones it is not told of: waking it would cost each publish
            # a context switch, and diagnostics read the segment's header.
            _announced = True
            notify({"t": "vars"})


def notify(message: protocol.Message) -> None:
    """Send `message` to the supervisor. If it is gone, there is nobody to tell:
    the stop pipe's EOF tells the worker the same."""
    if _context is not None:
        _send(protocol.encode(message))


def _send(data: bytes) -> None:
    """Write one encoded report whole (a thread's heartbeat never lands
    inside another's report)."""
    assert _context is not None
    with _write_lock:
        try:
            while data:
                data = data[os.write(_context.notify_fd, data) :]
        except OSError:
            pass


def install(context: Context) -> None:
    """Make this process a worker (called by the runtime in the child only)."""
    global _context, _handle, _publisher, _announced
    _context = context
    _handle = _publisher = None
    _announced = False
