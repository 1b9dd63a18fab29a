"""The `bgpool` command line: argument parsing and display over the public API.

    bgpool run CONFIG.py [--metrics-port P] [--metrics-host H] [--plain] [--timestamps]
               [-- COMMAND [ARG...]]
    bgpool status [--json] [--address A | --pool NAME]
    bgpool ensure NAME... [--timeout S] [--scope LABEL] [--address A | --pool NAME]
    bgpool diagnostics NAME [--json] [--scope LABEL] [--address A | --pool NAME]
    bgpool restart [NAME...] [--scope LABEL] [--address A | --pool NAME]
    bgpool start NAME... [--scope LABEL] [--address A | --pool NAME]
    bgpool stop NAME... [--scope LABEL] [--address A | --pool NAME]
    bgpool scale NAME NUM [--scope LABEL] [--address A | --pool NAME]
    bgpool reload [--address A | --pool NAME]
    bgpool logs NAME [-n N] [-f] [--scope LABEL] [--address A | --pool NAME]

Every command but `run` (in `run.py`) finds the pool through `--address`, else
`--pool`, else `$BGPOOL_ADDRESS`, else the only named pool of this user that
runs (`locate()`); what they print is made in `display.py`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import selectors
import sys
from collections.abc import Callable, Sequence

from .. import texts
from ..app.client import LogFollow, PoolClient, connect, locate
from ..errors import BgpoolError
from ..models import WorkerStatus
from .display import (
    format_diagnostics,
    format_log_line,
    format_table,
    holder_words,
    policy_notes,
    print_error,
    status_rows,
)
from .run import run
from .wakeup import signal_wakeup


def _client_command(action: Callable[[PoolClient], int], address: str | None) -> int:
    try:
        with connect(address) as client:
            return action(client)
    except (BgpoolError, TypeError, ValueError) as exc:
        return _failed(exc)


def _failed(exc: Exception) -> int:
    """Say why a command failed; its exit status (2: an argument the API refused)."""
    if isinstance(exc, BgpoolError):
        print_error(exc)
        return 1
    print(f"bgpool: {exc}", file=sys.stderr)
    return 2


NOT_READY = 3
"""`bgpool status`'s exit status when an instance that should run is not
ready (supervisorctl's, the LSB's "program is not running")."""


def _should_run(s: WorkerStatus) -> bool:
    """Whether `bgpool status` counts an instance: every one of an eager
    worker (one stopped by `bgpool stop` too: it is down), and one of a lazy
    worker or a catch-all name unless it is stopped (never started, or
    stopped on purpose); not a singleton on standby (it runs elsewhere)."""
    return (s.eager or s.state != "stopped") and s.state != "standby"


def status(address: str | None, as_json: bool) -> int:
    """`bgpool status`: every instance of the running pool; exit 0 when each
    that should run is ready, 3 when one is not."""

    def show(client: PoolClient) -> int:
        statuses = client.status()
        if as_json:
            print(json.dumps([s.model_dump(mode="json") for s in statuses], indent=2))
        else:
            print(format_table(status_rows(statuses)))
            for s in statuses:  # a singleton held elsewhere: by whom
                if s.state == "standby" and s.instance == 0:
                    d = client.diagnostics(s.name, scope=s.scope)
                    print(f"{s.name}: standby, {holder_words(d)}")
            notes = policy_notes(statuses)
            if notes:
                print("\n" + "\n".join(notes))
            if client.name is None:
                print(f"\n{texts.unnamed_pool(client.address)}")
        due = [s for s in statuses if _should_run(s)]
        return 0 if all(s.state == "ready" for s in due) else NOT_READY

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


def restart(address: str | None, names: list[str], scope: str | None) -> int:
    """`bgpool restart`: new code for the running instances of `names` (every
    worker when none is given), rolling."""

    def act(client: PoolClient) -> int:
        client.restart_workers(names or None, scope=scope)
        print(f"restarted {', '.join(names)}" if names else "workers restarted")
        return 0

    return _client_command(act, address)


def start(address: str | None, names: list[str], scope: str | None) -> int:
    """`bgpool start`: start what is not running of those workers, without waiting."""

    def act(client: PoolClient) -> int:
        client.start_workers(names, scope=scope)
        print(f"started {', '.join(names)}")
        return 0

    return _client_command(act, address)


def stop(address: str | None, names: list[str], scope: str | None) -> int:
    """`bgpool stop`: drain those workers and keep them stopped."""

    def act(client: PoolClient) -> int:
        client.stop(names, scope=scope)
        print(f"stopped {', '.join(names)}")
        return 0

    return _client_command(act, address)


def scale(address: str | None, name: str, num: int, scope: str | None) -> int:
    """`bgpool scale`: a named worker's instance count from now on."""

    def act(client: PoolClient) -> int:
        client.scale(name, num, scope=scope)
        print(f"scaled {name} to {num} instance{'' if num == 1 else 's'}")
        return 0

    return _client_command(act, address)


def _count(text: str) -> int:
    """`bgpool scale`'s NUM: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value}")
    return value


def reload(address: str | None) -> int:
    """`bgpool reload`: have `bgpool run` load its config file again and apply it."""

    def act(client: PoolClient) -> int:
        print(client.reload_config())
        return 0

    return _client_command(act, address)


def logs(address: str | None, name: str, lines: int, follow: bool, scope: str | None) -> int:
    """`bgpool logs`: a worker's last lines; with `follow`, then its new lines
    as they come, until Ctrl-C (exit 0) or the pool closes."""

    def show(client: PoolClient) -> int:
        if not follow:
            for line in client.logs(name, lines, scope=scope):
                print(format_log_line(name, line))
            return 0
        with client.follow_logs(name, lines, scope=scope) as following:
            return _follow(name, following)

    try:
        return _client_command(show, address)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `bgpool logs NAME | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 0


def _follow(name: str, following: LogFollow) -> int:
    """Print `following`'s lines as they come, and what was dropped, until the
    pool closes (or Ctrl-C, which the wakeup pipe lets interrupt the wait
    whenever it comes)."""
    dropped = 0
    with selectors.DefaultSelector() as selector, signal_wakeup() as (wake_r, _):
        selector.register(following, selectors.EVENT_READ)
        selector.register(wake_r, selectors.EVENT_READ)
        while True:
            found = following.lines()
            if found is None:
                print("bgpool: the pool closed", file=sys.stderr)
                return 0
            if following.dropped > dropped:
                print(
                    f"bgpool: {following.dropped - dropped} lines dropped "
                    "(they came faster than this terminal took them)",
                    file=sys.stderr,
                )
                dropped = following.dropped
            for line in found:
                print(format_log_line(name, line))
            sys.stdout.flush()
            if not found:
                for key, _ in selector.select():
                    if key.fd == wake_r:  # a signal's handler ran (or raises now)
                        os.read(wake_r, 64)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bgpool", description="Run and inspect supervised background workers."
    )
    parser.add_argument("--version", action="version", version=f"bgpool {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run_parser = commands.add_parser(
        "run",
        help="run the pool a Python config file declares",
        description="Run the pool CONFIG declares (a Python file defining "
        "config = PoolConfig(...)) and show its workers' states: a table updated in "
        "place on a terminal, a line per change otherwise. SIGTERM or SIGINT drains "
        "the workers and exits 0; SIGHUP (or `bgpool reload`) loads CONFIG again, applies "
        "it and restarts every worker on new code. Exits 1 with the diagnostics "
        "if start-up fails, 2 if an option is invalid or CONFIG cannot be loaded. "
        "With `-- COMMAND [ARG...]`: "
        "run COMMAND once the pool is up (BGPOOL_ADDRESS set), pass it SIGTERM, SIGINT, "
        "SIGHUP and the other signals bgpool run receives, drain the pool when it exits "
        "and exit with its status (128+N if signal N killed it); a second SIGTERM or "
        "SIGINT during a drain skips the rest of the grace period.",
    )
    run_parser.add_argument("config", metavar="CONFIG", help="path to the Python config file")
    # no type=: run.py checks each option as the PoolConfig field it sets
    run_parser.add_argument(
        "--metrics-port", metavar="PORT", help="serve /metrics, the probes and the status page"
    )
    run_parser.add_argument(
        "--metrics-host", metavar="HOST", help="address to serve them on (127.0.0.1)"
    )
    run_parser.add_argument("--plain", action="store_true", help="a line per change, always")
    run_parser.add_argument(
        "--timestamps", action="store_true", help="prefix each worker line with its time"
    )

    address = argparse.ArgumentParser(add_help=False)
    address.add_argument("--address", help="control socket of the pool ($BGPOOL_ADDRESS)")
    address.add_argument(
        "--pool", metavar="NAME", help="name of the pool (PoolConfig.name); without "
        "--address, --pool or $BGPOOL_ADDRESS: the only named pool running",
    )  # fmt: skip

    def against_a_pool(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[address], help=summary, description=description)

    status_parser = against_a_pool(
        "status", "show every worker instance",
        "Show every instance of the running pool: name, scope, index, pid, state, "
        "attempts, consecutive failures, last exit status, uptime, time ready. Exits 0 "
        "when every instance that should run is ready, 3 when one is not: each instance "
        "of an eager worker (one stopped by `bgpool stop` too), and each of a lazy "
        "worker or catch-all name that is not stopped (not a singleton on standby, which "
        "runs on another pool: a line names its holder).",
    )  # fmt: skip
    status_parser.add_argument("--json", action="store_true", help="print JSON")
    ensure_parser = against_a_pool(
        "ensure", "start workers if needed and wait until ready",
        "Start the named workers if needed and wait until each is ready. Exits 0 when "
        "they are, 1 with the diagnostics otherwise.",
    )  # fmt: skip
    ensure_parser.add_argument("names", nargs="+", metavar="NAME")
    ensure_parser.add_argument("--timeout", type=float, help="seconds (the pool's default)")
    ensure_parser.add_argument("--scope", help="scope label to resolve the names in")
    diagnostics_parser = against_a_pool(
        "diagnostics", "explain a worker's state",
        "Explain a worker's state: attempts, last exit, last exception and traceback, "
        "last output lines, instances.",
    )  # fmt: skip
    diagnostics_parser.add_argument("name", metavar="NAME")
    diagnostics_parser.add_argument("--scope", help="scope label to resolve the name in")
    diagnostics_parser.add_argument("--json", action="store_true", help="print JSON")
    restart_parser = against_a_pool(
        "restart", "run new code in running workers",
        "Load the workers' code afresh and replace the running instances of each NAME "
        "(every worker when none is given) with ones that run it: a pool one instance "
        "at a time. Returns once every replacement is ready; exits 1 naming those "
        "whose new code failed (their old instances keep running).",
    )  # fmt: skip
    restart_parser.add_argument("names", nargs="*", metavar="NAME")
    restart_parser.add_argument("--scope", help="scope label to resolve the names in")
    start_parser = against_a_pool(
        "start", "start stopped workers",
        "Start whatever is not running of each NAME (stopped by `bgpool stop`, lazy, or "
        "given up after boot failures: every instance) and return without waiting for "
        "readiness (`bgpool ensure` waits). Exits 1 if a NAME is not declared (nothing "
        "is started then).",
    )  # fmt: skip
    start_parser.add_argument("names", nargs="+", metavar="NAME")
    start_parser.add_argument("--scope", help="scope label to resolve the names in")
    stop_parser = against_a_pool(
        "stop", "stop workers and keep them stopped",
        "Drain every instance of each NAME (stop pipe closed, the pool's grace period, "
        "then SIGTERM and SIGKILL) and return once all have exited. They stay declared, "
        "stopped: nothing restarts them until `bgpool start` or an ensure() asks. Exits "
        "1 if a NAME is not declared (nothing is stopped then).",
    )  # fmt: skip
    stop_parser.add_argument("names", nargs="+", metavar="NAME")
    stop_parser.add_argument("--scope", help="scope label to resolve the names in")
    scale_parser = against_a_pool(
        "scale", "change a worker's number of instances",
        "Give the named worker NAME NUM instances from now on, as if declared with "
        "num=NUM: 0 stops them all, growing starts the new ones (unless NAME is stopped), "
        "shrinking drains the highest indexes and returns once they have exited. Holds "
        "until a reload changes NAME's declaration. Exits 1 if NAME is not declared, 2 "
        "if a catch-all serves it or NUM is not an integer >= 0.",
    )  # fmt: skip
    scale_parser.add_argument("name", metavar="NAME")
    scale_parser.add_argument("num", metavar="NUM", type=_count, help="instances, 0 or more")
    scale_parser.add_argument("--scope", help="scope label to resolve the name in")
    against_a_pool(
        "reload", "make `bgpool run` load its config file again",
        "Have the `bgpool run` that owns the pool load its config file again, apply it "
        "(workers added, removed, changed) and restart every worker on new code, as "
        "SIGHUP does; prints what changed. Exits 1 if the config could not be applied "
        "(the pool keeps running as it was).",
    )  # fmt: skip
    logs_parser = against_a_pool(
        "logs", "print a worker's last output lines",
        "Print the last lines worker NAME's instances wrote (stdout and stderr), each with "
        "its time, instance and stream: the pool keeps the last PoolConfig.log_lines of "
        "every name. With -f, then print new lines as they come, until Ctrl-C or the pool "
        "closes.",
    )  # fmt: skip
    logs_parser.add_argument("name", metavar="NAME")
    logs_parser.add_argument(
        "-n", "--lines", type=int, default=100, metavar="N", help="how many (100)"
    )
    logs_parser.add_argument("-f", "--follow", action="store_true", help="then follow new lines")
    logs_parser.add_argument("--scope", help="scope label to resolve the name in")
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("bgpool")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "(not installed)"


def _split_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """`bgpool run ... -- COMMAND ARG...`: the arguments before `--`, and
    COMMAND with its own (None without `--`), left unparsed."""
    if argv[:1] != ["run"] or "--" not in argv:
        return argv, None
    at = argv.index("--")
    return argv[:at], argv[at + 1 :]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `bgpool` command."""
    parser = _parser()
    own, command = _split_command(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(own)
    if command == []:
        parser.error("-- must be followed by a COMMAND to run")
    if args.command == "run":
        return run(
            args.config,
            args.metrics_port,
            args.metrics_host,
            args.plain,
            command or (),
            args.timestamps,
        )
    try:
        args.address = locate(args.address, args.pool)
    except (BgpoolError, TypeError, ValueError) as exc:
        return _failed(exc)
    if args.command == "status":
        return status(args.address, args.json)
    if args.command == "ensure":
        return ensure(args.address, args.names, args.timeout, args.scope)
    if args.command == "diagnostics":
        return diagnostics(args.address, args.name, args.scope, args.json)
    if args.command == "restart":
        return restart(args.address, args.names, args.scope)
    if args.command == "start":
        return start(args.address, args.names, args.scope)
    if args.command == "stop":
        return stop(args.address, args.names, args.scope)
    if args.command == "scale":
        return scale(args.address, args.name, args.num, args.scope)
    if args.command == "logs":
        return logs(args.address, args.name, args.lines, args.follow, args.scope)
    return reload(args.address)


if __name__ == "__main__":
    sys.exit(main())
