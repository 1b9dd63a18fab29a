"""What the `bgpool` command prints: the status table, diagnostics, errors, and
`bgpool run`'s two views of a running pool (a line per state change, or a table
redrawn in place on a terminal)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime

from ..app.client import PoolClient
from ..errors import BgpoolError, EnsureTimeout, StartupError, WorkerBootFailed
from ..models import WorkerDiagnostics, WorkerStatus

STATUS_COLUMNS = ("WORKER", "SCOPE", "#", "PID", "STATE", "ATTEMPTS", "FAILS", "EXIT", "UPTIME",
                  "READY FOR")  # fmt: skip


def _label(name: str, scope: str, instance: int) -> str:
    return f"{scope}:{name}.{instance}" if scope else f"{name}.{instance}"


def _ago(moment: datetime | None, now: float) -> str:
    if moment is None:
        return "-"
    seconds = max(0, int(now - moment.timestamp()))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def status_rows(statuses: Sequence[WorkerStatus]) -> list[tuple[str, ...]]:
    """One row per instance: name, scope, index, pid, state, attempts,
    consecutive failures, last exit, uptime, how long it has been ready."""
    now = time.time()
    return [
        (
            s.name, s.scope or "-", str(s.instance), str(s.pid or "-"), s.state,
            str(s.attempts), str(s.consecutive_failures),
            "-" if s.last_exit_status is None else str(s.last_exit_status),
            _ago(s.started_at, now) if s.pid else "-",
            _ago(s.ready_at, now) if s.state == "ready" else "-",
        )
        for s in statuses
    ]  # fmt: skip


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str] = STATUS_COLUMNS) -> str:
    """Rows as aligned columns under a header."""
    table = [tuple(header), *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in table)  # fmt: skip


def format_diagnostics(d: WorkerDiagnostics) -> str:
    """A worker's diagnostics as readable lines."""
    was_ready = d.ever_ready and d.state != "ready"
    last_exit = "none yet" if d.last_exit_status is None else str(d.last_exit_status)
    lines = [
        f"worker:       {d.name}" + (f" (scope {d.scope})" if d.scope else ""),
        f"target:       {d.target}",
        f"state:        {d.state}" + (" (was ready)" if was_ready else ""),
        f"attempts:     {d.attempts}, consecutive failures {d.consecutive_failures}",
        f"last exit:    {last_exit}" + (f" ({d.last_signal})" if d.last_signal else ""),
    ]
    if d.vars_generation:
        published = d.vars_published_at
        when = f", published {published.astimezone():%Y-%m-%d %H:%M:%S}" if published else ""
        lines.append(f"vars:         generation {d.vars_generation}{when}")
    if d.last_error is not None:
        e = d.last_error
        lines.append(f"last error:   {e.type}: {e.message}")
        if e.filename:
            lines.append(f"              at {e.filename}, line {e.lineno}")
        lines.append("traceback:\n  " + e.traceback.replace("\n", "\n  "))
    if d.last_output:
        lines.append("last output:\n  " + "\n  ".join(d.last_output))
    if d.instances:
        lines.append(format_table(status_rows(d.instances)))
    return "\n".join(lines)


def print_error(exc: BgpoolError) -> None:
    """An error on stderr, followed by the diagnostics it carries (if any)."""
    print(f"bgpool: {type(exc).__name__}: {exc}", file=sys.stderr)
    if isinstance(exc, EnsureTimeout | WorkerBootFailed | StartupError) and exc.diagnostics:
        found = exc.diagnostics if isinstance(exc.diagnostics, list) else [exc.diagnostics]
        for diagnostics in found:
            print(format_diagnostics(diagnostics), file=sys.stderr)


class PlainView:
    """`bgpool run`'s display when stdout is not a terminal: a line per state
    change."""

    def started(self, pool: PoolClient) -> None:
        """Show every instance's state once, as the pool starts being watched."""
        for s in pool.status():
            self.event(s.name, s.scope, s.instance, s.state, f"pid {s.pid}" if s.pid else "")

    def event(self, name: str, scope: str, instance: int, state: str, detail: str) -> None:
        """Show one state change."""
        label = _label(name, scope, instance)
        print(f"{time.strftime('%H:%M:%S')} {label:<24} {state:<9} {detail}".rstrip(), flush=True)

    def output(self, fd: int, data: bytes) -> None:
        """Write the supervisor's output to `fd` (1 or 2)."""
        os.write(fd, data)

    def note(self, text: str) -> None:
        """A line from `bgpool run` itself."""
        print(f"bgpool: {text}", flush=True)


class LiveView:
    """`bgpool run`'s display on a terminal: a compact table redrawn in place;
    worker output and notes scroll above it."""

    def __init__(self) -> None:
        self._pool: PoolClient | None = None
        self._height = 0
        self._details: dict[tuple[str, str, int], str] = {}

    def started(self, pool: PoolClient) -> None:
        """Draw the table of `pool`'s instances, read again at every redraw."""
        self._pool = pool
        self._draw()

    def event(self, name: str, scope: str, instance: int, state: str, detail: str) -> None:
        """Note one state change in the instance's LAST CHANGE cell."""
        self._details[(scope, name, instance)] = f"{time.strftime('%H:%M:%S')} {detail}"
        self._draw()

    def output(self, fd: int, data: bytes) -> None:
        """Write the supervisor's output to `fd` (1 or 2), above the table."""
        self._erase()
        os.write(fd, data)
        self._draw()

    def note(self, text: str) -> None:
        """A line from `bgpool run` itself, above the table."""
        self._erase()
        print(f"bgpool: {text}", flush=True)
        self._draw()

    def _erase(self) -> None:
        if self._height:
            sys.stdout.write(f"\x1b[{self._height}F\x1b[J")
            self._height = 0

    def _draw(self) -> None:
        if self._pool is None:
            return
        try:
            statuses = self._pool.status()
        except BgpoolError:
            return
        rows = [
            (*row[:5], row[8], self._details.get((s.scope, s.name, s.instance), ""))
            for row, s in zip(status_rows(statuses), statuses, strict=True)
        ]
        text = format_table(rows, (*STATUS_COLUMNS[:5], "UPTIME", "LAST CHANGE"))
        self._erase()
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        self._height = text.count("\n") + 1


View = PlainView | LiveView
