"""What the `bgpool` command prints: the status table, diagnostics, errors, and
`bgpool run`'s two views of a running pool (a line per state change, or a table
redrawn in place on a terminal)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime

from rich.console import Console
from rich.constrain import Constrain
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .. import platform
from ..app.client import PoolClient
from ..errors import BgpoolError, EnsureTimeout, StartupError, WorkerBootFailed
from ..models import LogLine, WorkerDiagnostics, WorkerStatus

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


def policy_notes(statuses: Sequence[WorkerStatus]) -> list[str]:
    """A line for each instance a lifecycle policy acted on: killed as hung,
    recycled (and why, the last time). `bgpool status` prints them under its
    table."""
    notes = []
    for s in statuses:
        done = []
        if s.hangs:
            done.append(f"killed as hung {_times(s.hangs)}")
        if s.recycles:
            done.append(f"recycled {_times(s.recycles)} (last: {s.last_recycle_reason})")
        if done:
            notes.append(f"{_label(s.name, s.scope, s.instance)}: {', '.join(done)}")
    return notes


def _times(count: int) -> str:
    return "once" if count == 1 else f"{count} times"


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
    if d.last_recycle_reason is not None:
        lines.append(f"recycled:     last for {d.last_recycle_reason}")
    if d.singleton:
        lines.append(f"lease:        {holder_words(d)}")
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


def holder_words(d: WorkerDiagnostics) -> str:
    """Who holds a singleton's lease: `held by HOST pid N since TIME, ...`."""
    h = d.holder
    if h is None:
        return "held by no pool (the coordinator may be unreachable)"
    where = "this pool" if h.here else f"{h.host} pid {h.pid}"
    ready = "ready" if h.ready else "not ready yet"
    return (f"held by {where} since {h.since.astimezone():%Y-%m-%d %H:%M:%S}, "
            f"fencing token {h.lease_token}, {ready}")  # fmt: skip


def format_log_line(name: str, line: LogLine) -> str:
    """One kept line as `bgpool logs` prints it: local time to the
    millisecond, the instance's label, the stream, the text."""
    when = line.time.astimezone().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return f"{when} {name}.{line.instance} {line.stream} | {line.line}"


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

    def close(self) -> None:
        """Nothing to put away: every line is printed as it comes."""


class LiveView:
    """`bgpool run`'s display on a terminal: a compact table kept in place at
    the bottom (a `rich.live.Live` region), fitted to the terminal's width
    (cells are cut, never wrapped, so a redraw always knows how many lines it
    replaces), its states coloured (unless `NO_COLOR` is set) and redrawn every
    second, so uptimes tick on a quiet pool. Worker output and notes scroll
    above it."""

    def __init__(self) -> None:
        self._console = Console(highlight=False, markup=False, emoji=False)
        self._live: Live | None = None
        self._pool: PoolClient | None = None
        self._statuses: list[WorkerStatus] = []  # as last read
        self._details: dict[tuple[str, str, int], str] = {}
        self._moves: dict[tuple[str, str, int], dict[str, object]] = {}  # the events' states
        self._partial = {1: b"", 2: b""}
        # stderr on the terminal too: its lines are shown above the table as well
        self._stderr_here = os.isatty(2)
        self._restore_echo: Callable[[], None] = lambda: None

    def started(self, pool: PoolClient) -> None:
        """Show the table of `pool`'s instances, read again at every redraw."""
        self._pool = pool
        self._live = Live(
            console=self._console,
            get_renderable=self._table,
            refresh_per_second=1 / TICK,
            redirect_stderr=self._stderr_here,
        )
        self._restore_echo = platform.hide_control_echo(sys.stdout.fileno())
        self._live.start()

    def event(self, name: str, scope: str, instance: int, state: str, detail: str) -> None:
        """Note one state change in the instance's LAST CHANGE cell."""
        self._details[(scope, name, instance)] = f"{time.strftime('%H:%M:%S')} {detail}"
        move: dict[str, object] = {"state": state}
        if state == "stopped":
            move["pid"] = None
        self._moves[(scope, name, instance)] = move
        if self._live is not None:
            self._live.refresh()

    def output(self, fd: int, data: bytes) -> None:
        """Show what the supervisor wrote to `fd` (1 or 2) above the table, a
        whole line at a time (stderr written as it is when it is not the
        terminal, its colours taken out)."""
        data = self._partial[fd] + data
        complete, _, self._partial[fd] = data.rpartition(b"\n")
        if complete:
            self._show(fd, complete.decode(errors="replace"))

    def _show(self, fd: int, text: str) -> None:
        if fd == 2 and not self._stderr_here:
            os.write(2, (Text.from_ansi(text).plain + "\n").encode())
        else:
            self._console.print(Text.from_ansi(text), soft_wrap=True)

    def note(self, text: str) -> None:
        """A line from `bgpool run` itself, above the table."""
        self._console.print(Text(f"bgpool: {text}"), soft_wrap=True)

    def close(self) -> None:
        """Leave the last table on the screen, below what was shown."""
        for fd, partial in self._partial.items():
            if partial:
                self._show(fd, partial.decode(errors="replace"))
        if self._live is not None:
            self._live.stop()
        self._restore_echo()

    def _current(self) -> list[WorkerStatus]:
        """Every instance as the table says now; once it can no longer be read
        (the pool closed), as it last said, with the states events told since."""
        if self._pool is not None:
            try:
                self._statuses = self._pool.status()
                self._moves.clear()
                return self._statuses
            except BgpoolError:
                pass
        return [
            s.model_copy(update=self._moves.get((s.scope, s.name, s.instance), {}))
            for s in self._statuses
        ]

    def _table(self) -> Constrain:
        """The table as it is now, a column narrower than the terminal (a
        full last line would leave the cursor past its end, where a
        terminal's echo of ^C wraps it onto a new line)."""
        statuses = self._current()
        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in (*STATUS_COLUMNS[:5], "UPTIME"):
            table.add_column(column, no_wrap=True, overflow="ellipsis")
        # the one column that gives way when the terminal is narrow
        table.add_column("LAST CHANGE", no_wrap=False)
        for row, s in zip(status_rows(statuses), statuses, strict=True):
            detail = self._details.get((s.scope, s.name, s.instance), "")
            table.add_row(
                *row[:4],
                Text(s.state, style=STATE_STYLES.get(s.state, "")),
                row[8],
                Text(detail, no_wrap=True, overflow="ellipsis"),
            )
        return Constrain(table, max(self._console.width - 1, 1))


TICK = 1.0
"""Seconds between two redraws of the live table when nothing happens."""

STATE_STYLES = {
    "ready": "green",
    "starting": "cyan",
    "stopping": "yellow",
    "backoff": "yellow",
    "crashed": "red",
    "aborted": "bold red",
    "stopped": "dim",
    "standby": "blue",
}
"""How the live table colours each state."""


def colour_labels(live: bool) -> bool:
    """Whether `bgpool run` colours its workers' labels: stdout is a terminal,
    `NO_COLOR` is not set (https://no-color.org), and either the live view
    shows them (it takes the colours out of what goes to a stderr that is not
    the terminal) or stderr is a terminal too (in the plain view the lines go
    there as they are)."""
    terminal = sys.stdout.isatty() and (live or sys.stderr.isatty())
    return terminal and not os.environ.get("NO_COLOR")


View = PlainView | LiveView
