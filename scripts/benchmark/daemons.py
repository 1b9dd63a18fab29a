"""The peers' daemons, supervisord and circusd, each a private one: its own config,
socket and logs in a temp dir, in a session of its own, supervising
`bench_workers.py peer` processes. `peer()` runs one for a block, or says why it
cannot (not installed, --no-peers, failed to start here): a peer is skipped,
never failed."""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from .channels import make_fifo, wait_until
from .machine import kill_leftovers

if TYPE_CHECKING:
    from .harness import Bench

WORKERS_SCRIPT = str(Path(__file__).resolve().parent.parent / "bench_workers.py")


class Daemon:
    """What both peers' daemons have: a temp dir, a FIFO their "lazy" worker
    writes its first line to, and a process in a session of its own. Closing
    asks it to quit, kills it if it has not exited after 60 s, then kills
    whatever it had started that is still running."""

    MODULE = ""  # the import that tells whether the peer is installed
    process: subprocess.Popen[bytes]

    def __init__(self, tmp: Path, prefix: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix, dir=tmp))
        self.fifo_path = self.dir / "first-line.fifo"
        self.fifo = make_fifo(self.fifo_path)

    def _launch(self, argv: list[str]) -> None:
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _wait_up(
        self,
        answers: Callable[[], bool],
        what: str,
        log: str,
        poll: float,
        then: Callable[[], None] | None = None,
    ) -> None:
        """Wait until `answers()` (a daemon that exits first fails at once), then
        for `then()`; on any failure, close the daemon before raising."""

        def up() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"{what} exited: see {self.dir}/{log}")
            return answers()

        try:
            wait_until(up, 30, f"{what} to answer", poll=poll)
            if then is not None:
                then()
        except BaseException:
            self.close()
            raise

    def _quit(self) -> None:
        """Ask the daemon to stop its processes and exit, waiting."""
        raise NotImplementedError

    def _disconnect(self) -> None:
        """Close this side of the connection to the daemon."""
        raise NotImplementedError

    def close(self) -> None:
        try:
            tree = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            tree = []
        with contextlib.suppress(Exception):
            self._quit()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._disconnect()
        kill_leftovers(tree)
        os.close(self.fifo)
        shutil.rmtree(self.dir, ignore_errors=True)


class Supervisord(Daemon):
    """A private supervisord, answering XML-RPC on its own unix socket."""

    MODULE = "supervisor.xmlrpc"

    def __init__(self, tmp: Path, *, idle: int = 0, hot_and_lazy: bool = True) -> None:
        from supervisor.xmlrpc import SupervisorTransport  # type: ignore[import-untyped]

        super().__init__(tmp, "sd-")
        self.sock = self.dir / "supervisor.sock"
        worker = f"{sys.executable} {WORKERS_SCRIPT} peer"
        program = "startsecs=0\nautorestart=false\nstopwaitsecs=10\nstdout_logfile=NONE\n"
        program += "stderr_logfile=NONE\n"
        parts = [
            f"[unix_http_server]\nfile={self.sock}\nchmod=0700\n",
            f"[supervisord]\nnodaemon=true\nlogfile={self.dir}/supervisord.log\n"
            f"pidfile={self.dir}/supervisord.pid\nchildlogdir={self.dir}\nloglevel=warn\n"
            f"minfds=8192\nminprocs=2048\n",
            "[rpcinterface:supervisor]\n"
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n",
        ]
        if hot_and_lazy:
            parts.append(f"[program:hot]\ncommand={worker}\nautostart=true\n{program}")
            parts.append(
                f"[program:lazy]\ncommand={worker} {self.fifo_path}\nautostart=false\n{program}"
            )
        if idle:
            parts.append(
                f"[program:idle]\ncommand={worker}\nprocess_name=%(program_name)s_%(process_num)04d"
                f"\nnumprocs={idle}\nautostart=false\n{program}"
            )
        conf = self.dir / "supervisord.conf"
        conf.write_text("\n".join(parts))
        self._launch([sys.executable, "-m", "supervisor.supervisord", "-c", str(conf)])
        self._transport = SupervisorTransport(None, None, f"unix://{self.sock}")
        import xmlrpc.client

        self.rpc: Any = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=self._transport)

        def answers() -> bool:
            try:
                return bool(self.rpc.supervisor.getState()["statename"] == "RUNNING")
            except (OSError, http.client.HTTPException):
                self._transport.close()  # not listening yet: reconnect next time
                return False

        def hot_running() -> None:
            wait_until(
                lambda: self.rpc.supervisor.getProcessInfo("hot")["statename"] == "RUNNING",
                30,
                "supervisord's hot process",
            )

        self._wait_up(
            answers,
            "supervisord",
            "supervisord.log",
            poll=0.01,
            then=hot_running if hot_and_lazy else None,
        )

    def _quit(self) -> None:
        self.rpc.supervisor.shutdown()

    def _disconnect(self) -> None:
        self._transport.close()


class Circusd(Daemon):
    """A private circusd, answering on its own ZeroMQ ipc endpoint."""

    MODULE = "circus.client"

    def __init__(self, tmp: Path) -> None:
        from circus.client import CircusClient  # type: ignore[import-untyped]

        super().__init__(tmp, "cd-")
        endpoint = f"ipc://{self.dir}/endpoint"
        ini = self.dir / "circus.ini"
        ini.write_text(
            f"[circus]\nendpoint = {endpoint}\npubsub_endpoint = ipc://{self.dir}/pubsub\n"
            f"statsd = False\nloglevel = WARNING\nlogoutput = {self.dir}/circus.log\n\n"
            f"[watcher:hot]\ncmd = {sys.executable}\nargs = {WORKERS_SCRIPT} peer\n"
            "numprocesses = 1\nautostart = True\ncopy_env = True\n\n"
            f"[watcher:lazy]\ncmd = {sys.executable}\nargs = {WORKERS_SCRIPT} peer "
            f"{self.fifo_path}\nnumprocesses = 1\nautostart = False\ncopy_env = True\n"
        )
        self._launch([sys.executable, "-c", "from circus.circusd import main; main()", str(ini)])
        self.client = CircusClient(endpoint=endpoint, timeout=30)

        def answers() -> bool:
            try:
                return self.call("status", name="hot").get("status") == "active"
            except Exception:  # not listening yet
                return False

        self._wait_up(answers, "circusd", "circus.log", poll=0.05)

    def call(self, command: str, **properties: Any) -> dict[str, Any]:
        reply: dict[str, Any] = self.client.call({"command": command, "properties": properties})
        if reply.get("status") == "error":
            raise RuntimeError(f"circus {command}: {reply}")
        return reply

    def _quit(self) -> None:
        self.call("quit", waiting=True)

    def _disconnect(self) -> None:
        with contextlib.suppress(Exception):
            self.client.stop()


def peer_available(bench: Bench, module: str, what: str) -> bool:
    if not bench.config.peers:
        bench.skip(what, "--no-peers")
        return False
    try:
        __import__(module)
    except ImportError as exc:
        bench.skip(
            what,
            f"{exc.name or module} is not installed in this environment "
            "(./scripts/bench installs the bench extra: pip install -e '.[bench]')",
        )
        return False
    return True


@contextlib.contextmanager
def peer(bench: Bench, kind: type[Daemon], what: str, *args: Any, **kwargs: Any) -> Iterator[Any]:
    """Start a peer daemon for a block, or yield None (skipped, with the reason
    printed) when it is not installed or cannot run here."""
    if not peer_available(bench, kind.MODULE, what):
        yield None
        return
    try:
        daemon = kind(bench.tmp, *args, **kwargs)
    except Exception as exc:
        bench.skip(what, f"it could not be started here: {type(exc).__name__}: {exc}")
        yield None
        return
    try:
        yield daemon
    finally:
        daemon.close()
