"""The supervisor process's entry point: read the bootstrap the application sent,
fork the seed that code generations are forked from (before importing the
supervisor's own modules and logging, so that generations and workers do not
carry them), set up logging (`logsetup.py`), then run the `Supervisor` (which
imports no user code: its code generations do, see `generations.py`).

Started by `Pool.start()` as a fresh interpreter (`python -c "...main()"`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import traceback
from typing import NoReturn

from .. import platform, texts
from ..launch import TRANSITIONS_SHOWN
from ..worker import zygote
from .registry import Decl


def start_seed(pool: str) -> socket.socket:
    """Fork the seed generations are forked from (`zygote.seed`; `pool` is the
    pool's label in process titles); the socket to it. Called before the
    supervisor imports its own modules, and logging."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if os.fork() == 0:  # pragma: no cover - the child never returns
        ours.close()
        zygote.seed(theirs, pool)
    theirs.close()
    return ours


def main() -> NoReturn:
    """Entry point of the supervisor process, started by `Pool.start()`.

    Reads its bootstrap (declarations, settings, the owner's pid, sys.path, a
    named pool's lock) as JSON from stdin, writes its table's name on the boot
    pipe (or why it could not start), then runs until shut down. It leaves
    with `os._exit()` once it has released all it held (`Supervisor.close`):
    the interpreter's own finalization would only free memory, and took 25 ms
    of every shutdown.
    """
    code = 1
    try:
        _serve()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _serve() -> None:
    bootstrap = json.loads(sys.stdin.buffer.read())
    # before the seed is forked: no worker inherits it
    transitions_shown = os.environ.pop(TRANSITIONS_SHOWN, "") == "1"
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # workers must not inherit the bootstrap pipe as stdin
    os.close(devnull)
    sys.path[:] = bootstrap["sys_path"]
    boot_fd: int = bootstrap["boot_fd"]
    platform.raise_fd_limit()
    pool = texts.pool_label(bootstrap["settings"]["name"], os.environ["BGPOOL_ADDRESS"])
    platform.set_process_title(texts.process_title("supervisor", pool))
    decls = [Decl.from_message(d) for d in bootstrap["workers"]]
    # First, before the supervisor's own modules and logging are imported
    # (`zygote.seed` says why): the process every generation, and so every
    # worker, is forked from; then the first generation, which loads the
    # targets while the supervisor imports.
    seed = start_seed(pool) if bootstrap["settings"]["start_method"] == "fork" else None
    from .generations import Generation, module_path

    first = None
    if seed is not None:
        root = bootstrap["settings"]["root"]
        with contextlib.suppress(OSError):  # the first spawn asks again, and says why
            first = Generation(1, decls, seed, module_path(root), pool)
    import logging

    from ..naming import NameLock
    from .core import Settings
    from .logsetup import logging_to_stderr, relay_logging
    from .loop import Supervisor

    with logging_to_stderr(os.environ.get("BGPOOL_LOG_LEVEL", "WARNING").upper()):
        logging.getLogger("bgpool.transitions").disabled = transitions_shown
        # A named pool's: the owner took it, and we hold it (and remove the
        # socket and pid file) until we exit.
        lock = NameLock(**bootstrap["name_lock"]) if bootstrap["name_lock"] else None
        settings = Settings(**bootstrap["settings"])
        platform.set_child_subreaper()
        # The owner put BGPOOL_ADDRESS in our environment at exec, so every
        # worker and everything it starts carries it where /proc shows it.
        boot = os.fdopen(boot_fd, "w")
        try:
            supervisor = Supervisor(
                decls,
                settings,
                bootstrap["owner_pid"],
                os.environ["BGPOOL_ADDRESS"],
                bootstrap["table"],
                seed,
                first,
                lock,
            )
        except Exception as exc:  # the owner raises StartupError with this
            if first is not None:
                first.close()
            with boot:
                boot.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
            raise SystemExit(1) from None
        supervisor.relay.decorate(**bootstrap["relay"])
        relay_logging(supervisor.relay)
        try:
            supervisor.install_signals()
            with boot:
                boot.write(json.dumps({"table": supervisor.table.name}) + "\n")
            supervisor.start_eager()
            supervisor.run()
        except BaseException:
            supervisor.kill_everything()
            raise
        finally:
            supervisor.close()


if __name__ == "__main__":
    main()
