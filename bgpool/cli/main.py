"""The `bgpool` command line: argument parsing and display over the public API.

    bgpool run CONFIG.py [--metrics-port P] [--metrics-host H] [--plain]
    bgpool status [--json] [--address A]
    bgpool ensure NAME... [--timeout S] [--scope LABEL] [--address A]
    bgpool diagnostics NAME [--json] [--scope LABEL] [--address A]
    bgpool restart [--address A]

Every command but `run` finds the pool through `--address`, else `$BGPOOL_ADDRESS`.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from .. import protocol
from ..app.client import PoolClient, connect
from ..app.pool import Pool
from ..declarations import PoolConfig
from ..errors import BgpoolError, StartupError, _WithDiagnostics
from ..models import WorkerDiagnostics, WorkerStatus


def load_config(path: str) -> PoolConfig:
    """Run the config file and return its `config`. Its directory and the current
    directory go first on sys.path (as `python CONFIG.py` and `python -m` would
    put them), so module targets beside the config or the project import."""
    for directory in (os.getcwd(), str(Path(path).resolve().parent)):
        if directory not in sys.path:
            sys.path.insert(0, directory)
    namespace = runpy.run_path(path, run_name="__bgpool_config__")
    config = namespace.get("config")
    if not isinstance(config, PoolConfig):
        raise BgpoolError(f"{path} must define config = PoolConfig(...)")
    return config


# -- display -----------------------------------------------------------------


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


STATUS_COLUMNS = ("WORKER", "SCOPE", "#", "PID", "STATE", "ATTEMPTS", "FAILS", "EXIT", "UPTIME",
                  "READY FOR")  # fmt: skip


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
    lines = [
        f"worker:       {d.name}" + (f" (scope {d.scope})" if d.scope else ""),
        f"target:       {d.target}",
        f"state:        {d.state}" + (" (was ready)" if d.ever_ready else ""),
        f"attempts:     {d.attempts}, consecutive failures {d.consecutive_failures}",
        f"last exit:    {d.last_exit_status}" + (f" ({d.last_signal})" if d.last_signal else ""),
    ]
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


def _print_error(exc: BgpoolError) -> None:
    print(f"bgpool: {type(exc).__name__}: {exc}", file=sys.stderr)
    if isinstance(exc, _WithDiagnostics) and exc.diagnostics:
        found = exc.diagnostics if isinstance(exc.diagnostics, list) else [exc.diagnostics]
        for diagnostics in found:
            print(format_diagnostics(diagnostics), file=sys.stderr)


# -- bgpool run --------------------------------------------------------------


class _Watch:
    """A subscription to the supervisor's state-change events."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(address)
        protocol.request(self.sock, {"op": "watch"})
        self.sock.setblocking(False)
        self.decoder = protocol.FrameDecoder()

    def events(self) -> list[protocol.Message] | None:
        """The events received so far; None once the supervisor is gone."""
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return []
        except OSError:
            return None
        return self.decoder.feed(data) if data else None


class _PlainView:
    """A line per state change (when stdout is not a terminal)."""

    def started(self, pool: Pool) -> None:
        for s in pool.status():
            self.event(s.name, s.scope, s.instance, s.state, f"pid {s.pid}" if s.pid else "")

    def event(self, name: str, scope: str, instance: int, state: str, detail: str) -> None:
        label = _label(name, scope, instance)
        print(f"{time.strftime('%H:%M:%S')} {label:<24} {state:<9} {detail}".rstrip(), flush=True)

    def output(self, fd: int, data: bytes) -> None:
        os.write(fd, data)

    def note(self, text: str) -> None:
        print(f"bgpool: {text}", flush=True)


class _LiveView:
    """A compact table redrawn in place on a terminal; worker output and notes
    scroll above it."""

    def __init__(self) -> None:
        self._pool: Pool | None = None
        self._height = 0
        self._details: dict[tuple[str, str, int], str] = {}

    def started(self, pool: Pool) -> None:
        self._pool = pool
        self._draw()

    def event(self, name: str, scope: str, instance: int, state: str, detail: str) -> None:
        self._details[(scope, name, instance)] = f"{time.strftime('%H:%M:%S')} {detail}"
        self._draw()

    def output(self, fd: int, data: bytes) -> None:
        self._erase()
        os.write(fd, data)
        self._draw()

    def note(self, text: str) -> None:
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


def run(config_path: str, metrics_port: int | None, metrics_host: str | None, plain: bool) -> int:
    """`bgpool run`: start the pool, show its state, stop on a signal."""
    try:
        config = load_config(config_path)
        updates = {"metrics_port": metrics_port, "metrics_host": metrics_host}
        config = config.model_copy(update={k: v for k, v in updates.items() if v is not None})
    except Exception:
        traceback.print_exc()
        print(f"bgpool: cannot load {config_path}; nothing was started", file=sys.stderr)
        return 2
    live = sys.stdout.isatty() and not plain
    view: _PlainView | _LiveView = _LiveView() if live else _PlainView()
    pool = Pool(config)
    selector = selectors.DefaultSelector()
    if live:  # route the supervisor's output through us, to print it above the table
        pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(2)]
        pool._stdio = (pipes[0][1], pipes[1][1])
        for target, (read_end, _) in zip((1, 2), pipes, strict=True):
            os.set_blocking(read_end, False)
            selector.register(read_end, selectors.EVENT_READ, ("output", target))
    try:
        try:
            pool.start()
        finally:
            if live:
                for _, write_end in pipes:
                    os.close(write_end)
        return _serve(pool, view, selector)
    except StartupError as exc:
        _print_error(exc)
        return 1
    finally:
        pool.shutdown()
        for key in list(selector.get_map().values()):
            if isinstance(key.fileobj, int):
                _drain_output(key.fileobj, key.data[1], view)
                os.close(key.fileobj)
        selector.close()


def _drain_output(fd: int, target: int, view: _PlainView | _LiveView) -> bool:
    try:
        data = os.read(fd, 65536)
    except BlockingIOError:
        return True
    if data:
        view.output(target, data)
    return bool(data)


def _serve(pool: Pool, view: _PlainView | _LiveView, selector: selectors.BaseSelector) -> int:
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    previous = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    handlers = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT,
                                                               signal.SIGHUP)}  # fmt: skip
    watch = _Watch(pool.address)
    stopper: threading.Thread | None = None
    try:
        metrics = f", metrics on port {pool.metrics_port}" if pool.metrics_port else ""
        view.note(f"pool running, BGPOOL_ADDRESS={pool.address}{metrics}")
        view.started(pool)
        selector.register(watch.sock, selectors.EVENT_READ, ("watch", 0))
        selector.register(wake_r, selectors.EVENT_READ, ("signal", 0))
        while True:
            for key, _ in selector.select():
                kind, target = key.data
                if kind == "output":
                    if not _drain_output(key.fd, target, view):
                        selector.unregister(key.fd)
                        os.close(key.fd)
                elif kind == "signal":
                    received = set(os.read(wake_r, 64))
                    if received & {signal.SIGTERM, signal.SIGINT} and stopper is None:
                        view.note("stopping (draining workers)")
                        # Drain in the background so the drain's events still show.
                        stopper = threading.Thread(target=pool.shutdown)
                        stopper.start()
                    elif signal.SIGHUP in received and stopper is None:
                        view.note("restarting workers")
                        pool.restart_workers()
                else:
                    events = watch.events()
                    if events is None:
                        if stopper is None:
                            view.note("the supervisor exited")
                            return 1
                        stopper.join()
                        view.note("stopped")
                        return 0
                    for e in events:
                        view.event(e["worker"], e["scope"], e["instance"], e["state"], e["detail"])
    finally:
        if stopper is not None:
            stopper.join()
        selector.unregister(watch.sock)
        selector.unregister(wake_r)
        watch.sock.close()
        signal.set_wakeup_fd(previous)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        os.close(wake_r)
        os.close(wake_w)


# -- commands against a running pool -------------------------------------------


def _client_command(action: Callable[[PoolClient], int], address: str | None) -> int:
    try:
        with connect(address) as client:
            return action(client)
    except BgpoolError as exc:
        _print_error(exc)
        return 1
    except (TypeError, ValueError) as exc:  # an argument the API refused
        print(f"bgpool: {exc}", file=sys.stderr)
        return 2


def status(address: str | None, as_json: bool) -> int:
    """`bgpool status`: every instance of the running pool."""

    def show(client: PoolClient) -> int:
        statuses = client.status()
        if as_json:
            print(json.dumps([s.model_dump(mode="json") for s in statuses], indent=2))
        else:
            print(format_table(status_rows(statuses)))
        return 0

    return _client_command(show, address)


def ensure(address: str | None, names: list[str], timeout: float | None, scope: str | None) -> int:
    """`bgpool ensure`: exit 0 once every name is ready, 1 with diagnostics."""

    def act(client: PoolClient) -> int:
        client.ensure(names, timeout, scope=scope)
        print(f"ready: {', '.join(names)}")
        return 0

    return _client_command(act, address)


def diagnostics(address: str | None, name: str, scope: str | None, as_json: bool) -> int:
    """`bgpool diagnostics`: why a worker is in its state."""

    def show(client: PoolClient) -> int:
        d = client.diagnostics(name, scope=scope)
        print(d.model_dump_json(indent=2) if as_json else format_diagnostics(d))
        return 0

    return _client_command(show, address)


def restart(address: str | None) -> int:
    """`bgpool restart`: drain and respawn every running worker (as SIGHUP to
    `bgpool run` does)."""

    def act(client: PoolClient) -> int:
        client._request({"op": "restart"}, timeout=None)
        print("workers restarted")
        return 0

    return _client_command(act, address)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bgpool", description="Run and inspect supervised background workers."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run_parser = commands.add_parser(
        "run",
        help="run the pool a Python config file declares",
        description="Run the pool CONFIG declares (a Python file defining "
        "config = PoolConfig(...)) and show its workers' states: a table updated in "
        "place on a terminal, a line per change otherwise. SIGTERM or SIGINT drains "
        "the workers and exits 0; SIGHUP restarts them. Exits 1 with the diagnostics "
        "if start-up fails, 2 if CONFIG cannot be loaded.",
    )
    run_parser.add_argument("config", help="path to the Python config file")
    run_parser.add_argument("--metrics-port", type=int, help="serve /metrics, /healthz, /readyz")
    run_parser.add_argument("--metrics-host", help="address to serve them on (127.0.0.1)")
    run_parser.add_argument("--plain", action="store_true", help="a line per change, always")

    address = argparse.ArgumentParser(add_help=False)
    address.add_argument("--address", help="control socket of the pool ($BGPOOL_ADDRESS)")
    status_parser = commands.add_parser(
        "status", parents=[address], help="show every worker instance",
        description="Show every instance of the running pool: name, scope, index, pid, "
        "state, attempts, consecutive failures, last exit status, uptime, time ready.",
    )  # fmt: skip
    status_parser.add_argument("--json", action="store_true", help="print JSON")
    ensure_parser = commands.add_parser(
        "ensure", parents=[address], help="start workers if needed and wait until ready",
        description="Start the named workers if needed and wait until each is ready. "
        "Exits 0 when they are, 1 with the diagnostics otherwise.",
    )  # fmt: skip
    ensure_parser.add_argument("names", nargs="+", metavar="NAME")
    ensure_parser.add_argument("--timeout", type=float, help="seconds (the pool's default)")
    ensure_parser.add_argument("--scope", help="scope label to resolve the names in")
    diagnostics_parser = commands.add_parser(
        "diagnostics", parents=[address], help="explain a worker's state",
        description="Explain a worker's state: attempts, last exit, last exception and "
        "traceback, last output lines, instances.",
    )  # fmt: skip
    diagnostics_parser.add_argument("name", metavar="NAME")
    diagnostics_parser.add_argument("--scope", help="scope label to resolve the name in")
    diagnostics_parser.add_argument("--json", action="store_true", help="print JSON")
    commands.add_parser(
        "restart", parents=[address], help="drain and respawn every running worker",
        description="Drain and respawn every running worker (what SIGHUP does to "
        "`bgpool run`); returns once all are respawned.",
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `bgpool` command."""
    args = _parser().parse_args(argv)
    if args.command == "run":
        return run(args.config, args.metrics_port, args.metrics_host, args.plain)
    if args.command == "status":
        return status(args.address, args.json)
    if args.command == "ensure":
        return ensure(args.address, args.names, args.timeout, args.scope)
    if args.command == "diagnostics":
        return diagnostics(args.address, args.name, args.scope, args.json)
    return restart(args.address)


if __name__ == "__main__":
    sys.exit(main())
