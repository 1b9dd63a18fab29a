"""The `bgpool` command line: argument parsing and display over the public API.

    bgpool run CONFIG.py [--metrics-port P] [--metrics-host H] [--plain]
    bgpool status [--json] [--address A | --pool NAME]
    bgpool ensure NAME... [--timeout S] [--scope LABEL] [--address A | --pool NAME]
    bgpool diagnostics NAME [--json] [--scope LABEL] [--address A | --pool NAME]
    bgpool restart [NAME...] [--scope LABEL] [--address A | --pool NAME]
    bgpool reload [--address A | --pool NAME]

Every command but `run` (in `run.py`) finds the pool through `--address`, else
`--pool`, else `$BGPOOL_ADDRESS`, else the only named pool of this user that
runs (`locate()`); what they print is made in `display.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from .. import texts
from ..app.client import PoolClient, connect, locate
from ..errors import BgpoolError
from .display import format_diagnostics, format_table, print_error, status_rows
from .run import run


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


def status(address: str | None, as_json: bool) -> int:
    """`bgpool status`: every instance of the running pool."""

    def show(client: PoolClient) -> int:
        statuses = client.status()
        if as_json:
            print(json.dumps([s.model_dump(mode="json") for s in statuses], indent=2))
        else:
            print(format_table(status_rows(statuses)))
            if client.name is None:
                print(f"\n{texts.unnamed_pool(client.address)}")
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


def restart(address: str | None, names: list[str], scope: str | None) -> int:
    """`bgpool restart`: new code for the running instances of `names` (every
    worker when none is given), rolling."""

    def act(client: PoolClient) -> int:
        client.restart_workers(names or None, scope=scope)
        print(f"restarted {', '.join(names)}" if names else "workers restarted")
        return 0

    return _client_command(act, address)


def reload(address: str | None) -> int:
    """`bgpool reload`: have `bgpool run` load its config file again and apply it."""

    def act(client: PoolClient) -> int:
        print(client.reload_config())
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
        "the workers and exits 0; SIGHUP (or `bgpool reload`) loads CONFIG again, applies "
        "it and restarts every worker on new code. Exits 1 with the diagnostics "
        "if start-up fails, 2 if CONFIG cannot be loaded.",
    )
    run_parser.add_argument("config", help="path to the Python config file")
    run_parser.add_argument("--metrics-port", type=int, help="serve /metrics, /healthz, /readyz")
    run_parser.add_argument("--metrics-host", help="address to serve them on (127.0.0.1)")
    run_parser.add_argument("--plain", action="store_true", help="a line per change, always")

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
        "attempts, consecutive failures, last exit status, uptime, time ready.",
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
    against_a_pool(
        "reload", "make `bgpool run` load its config file again",
        "Have the `bgpool run` that owns the pool load its config file again, apply it "
        "(workers added, removed, changed) and restart every worker on new code, as "
        "SIGHUP does; prints what changed. Exits 1 if the config could not be applied "
        "(the pool keeps running as it was).",
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `bgpool` command."""
    args = _parser().parse_args(argv)
    if args.command == "run":
        return run(args.config, args.metrics_port, args.metrics_host, args.plain)
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
    return reload(args.address)


if __name__ == "__main__":
    sys.exit(main())
