"""The `bgpool` command line: argument parsing over the public API.

bgpool run CONFIG.py    run the pool CONFIG.py declares (`config = PoolConfig(...)`),
                        printing every worker's state changes; SIGTERM/SIGINT drain
                        and exit, SIGHUP restarts the workers.
"""

from __future__ import annotations

import argparse
import os
import runpy
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from . import protocol
from .client import Pool
from .declarations import PoolConfig
from .errors import BgpoolError, StartupError
from .models import WorkerDiagnostics


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


def _line(worker: str, scope: str, instance: int, state: str, detail: str) -> str:
    label = f"{scope}:{worker}.{instance}" if scope else f"{worker}.{instance}"
    return f"{time.strftime('%H:%M:%S')} {label:<24} {state:<9} {detail}"


def format_diagnostics(diagnostics: WorkerDiagnostics) -> str:
    """A worker's diagnostics as a few readable lines."""
    d = diagnostics
    lines = [
        f"{d.name}: {d.state} (target {d.target}, attempts {d.attempts}, "
        f"consecutive failures {d.consecutive_failures}, last exit {d.last_exit_status}"
        + (f", {d.last_signal}" if d.last_signal else "")
        + ")"
    ]
    if d.last_error is not None:
        lines.append("  " + d.last_error.traceback.replace("\n", "\n  "))
    return "\n".join(lines)


def _print_startup_error(exc: StartupError) -> None:
    print(f"bgpool: {exc}", file=sys.stderr)
    for diagnostics in exc.diagnostics or []:
        print(format_diagnostics(diagnostics), file=sys.stderr)


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


def run(config_path: str) -> int:
    """`bgpool run`: start the pool, show state changes, stop on a signal."""
    try:
        config = load_config(config_path)
    except Exception:
        traceback.print_exc()
        print(f"bgpool: cannot load {config_path}; nothing was started", file=sys.stderr)
        return 2
    pool = Pool(config)
    try:
        pool.start()
    except StartupError as exc:
        _print_startup_error(exc)
        return 1
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)
    selector = selectors.DefaultSelector()
    watch = _Watch(pool.address)
    stopper: threading.Thread | None = None
    try:
        print(f"bgpool: pool running, BGPOOL_ADDRESS={pool.address}", flush=True)
        for status in pool.status():
            detail = f"pid {status.pid}" if status.pid else ""
            print(_line(status.name, status.scope, status.instance, status.state, detail))
        sys.stdout.flush()
        selector.register(watch.sock, selectors.EVENT_READ, "watch")
        selector.register(wake_r, selectors.EVENT_READ, "signal")
        while True:
            for key, _ in selector.select():
                if key.data == "signal":
                    received = set(os.read(wake_r, 64))
                    if received & {signal.SIGTERM, signal.SIGINT} and stopper is None:
                        print("bgpool: stopping (draining workers)", flush=True)
                        # Drain in the background so the drain's events still print.
                        stopper = threading.Thread(target=pool.shutdown)
                        stopper.start()
                    elif signal.SIGHUP in received and stopper is None:
                        print("bgpool: restarting workers", flush=True)
                        pool.restart_workers()
                    continue
                events = watch.events()
                if events is None:
                    if stopper is None:
                        print("bgpool: the supervisor exited", file=sys.stderr)
                        return 1
                    print("bgpool: stopped", flush=True)
                    return 0
                for event in events:
                    print(_line(event["worker"], event["scope"], event["instance"],
                                event["state"], event["detail"]), flush=True)  # fmt: skip
    finally:
        if stopper is not None:
            stopper.join()
        selector.close()
        watch.sock.close()
        pool.shutdown()
        signal.set_wakeup_fd(-1)
        os.close(wake_r)
        os.close(wake_w)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `bgpool` command."""
    parser = argparse.ArgumentParser(
        prog="bgpool", description="Run supervised background workers."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser(
        "run",
        help="run the pool a Python config file declares",
        description="Run the pool CONFIG declares (a Python file defining "
        "config = PoolConfig(...)). Prints each worker's state as it changes. "
        "SIGTERM or SIGINT drains the workers and exits; SIGHUP restarts them.",
    )
    run_parser.add_argument("config", help="path to the Python config file")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(args.config)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
