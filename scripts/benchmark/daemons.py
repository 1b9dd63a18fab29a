"""The peers' daemons, supervisord, circusd and pm2's, each a private one: its own
config, sockets and logs in a temp dir, in a session of its own, supervising
`bench_workers.py peer` processes. What a daemon runs is its `Setup`; each daemon
offers the same requests (start and stop its lazy process, start and stop its
group of N, report its status), named for the table by its `SUBJECTS`, and
restarts its crashing process by itself. `peer()` runs one for a block, or says
why it cannot (not installed, --no-peers, failed to start here): a peer is
skipped, never failed."""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import psutil

from .channels import make_fifo, wait_readable, wait_until
from .harness import per_call_us
from .machine import ROOT, kill_leftovers

if TYPE_CHECKING:
    from .harness import Bench

WORKERS_SCRIPT = str(Path(__file__).resolve().parent.parent / "bench_workers.py")
PM2_PREFIX = ROOT / ".bench-node"  # where pm2 is installed from the npm registry (gitignored)
PM2_MODULE = PM2_PREFIX / "node_modules" / "pm2"
PM2_DRIVER = Path(__file__).resolve().parent / "pm2_driver.js"


@dataclass(frozen=True)
class Setup:
    """What a daemon runs: "hot" (running) and "lazy" (declared, stopped) with
    `hot_and_lazy`; a group "idle" of `group` declared, stopped processes; with
    `crash`, a "crash" process started at once and restarted by the daemon
    whenever it exits (it exits on a byte written to the daemon's trigger)."""

    hot_and_lazy: bool = True
    group: int = 0
    crash: bool = False


class Daemon:
    """What every peer's daemon has: a temp dir, a FIFO its workers write their
    first line to (the "lazy", "idle" and "crash" processes), the FIFO that
    crashes the "crash" process, and a process in a session of its own.
    `timeout` bounds every request and wait. Closing asks it to quit, kills it
    if it has not exited after 60 s, then kills whatever it had started that is
    still running."""

    NAME: ClassVar[str] = ""
    MODULE: ClassVar[str] = ""  # the import that tells whether the peer is installed
    SUBJECTS: ClassVar[dict[str, str]] = {}  # hot, cold, crash, start and drain ({n})
    process: subprocess.Popen[bytes]

    def __init__(self, tmp: Path, setup: Setup, timeout: float) -> None:
        self.setup = setup
        self.timeout = timeout
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.NAME}-", dir=tmp))
        self.fifo_path = self.dir / "first-line.fifo"
        self.fifo = make_fifo(self.fifo_path)
        self.trigger_path = self.dir / "crash.fifo"
        self.trigger = make_fifo(self.trigger_path)

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this peer cannot run here, or None."""
        try:
            __import__(cls.MODULE)
        except ImportError as exc:
            return (
                f"{exc.name or cls.MODULE} is not installed in this environment "
                "(./scripts/bench installs the bench extra: pip install -e '.[bench]')"
            )
        return None

    def worker(self, program: str) -> list[str]:
        """The argv of a `program` ("hot", "lazy", "idle" or "crash") worker."""
        fifos = {"hot": [], "crash": [self.fifo_path, self.trigger_path]}
        return [
            sys.executable,
            WORKERS_SCRIPT,
            "peer",
            *map(str, fifos.get(program, [self.fifo_path])),
        ]

    def _launch(self, argv: list[str], **kwargs: Any) -> None:
        self.process = subprocess.Popen(
            argv,
            stdin=kwargs.pop("stdin", subprocess.DEVNULL),
            stdout=kwargs.pop("stdout", subprocess.DEVNULL),
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            **kwargs,
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

    # the requests the cases make (each daemon's own)
    def hot_per_call(self, calls: int, batches: int) -> tuple[list[float], int]:
        """us per status request of the running "hot" process, per batch of
        calls (after a warm-up batch); and the calls per batch."""
        raise NotImplementedError

    def start_lazy(self) -> None:
        raise NotImplementedError

    def stop_lazy(self) -> None:
        raise NotImplementedError

    def start_group(self) -> None:
        """Start every process of the group "idle" (returns once the daemon
        says so: the benchmark then waits for their first lines)."""
        raise NotImplementedError

    def stop_group(self) -> None:
        """Stop every process of the group, until the daemon says they exited."""
        raise NotImplementedError

    def forget_group(self) -> None:
        """After stop_group(), untimed: whatever the next start_group() needs."""

    def supervisor_pid(self) -> int:
        """The process that supervises the workers."""
        return self.process.pid

    def worker_pids(self) -> list[int]:
        """The running bench_workers processes the daemon supervises."""
        found = []
        for child in psutil.Process(self.supervisor_pid()).children():
            with contextlib.suppress(psutil.Error):
                if WORKERS_SCRIPT in child.cmdline():
                    found.append(child.pid)
        return found

    def _quit(self) -> None:
        """Ask the daemon to stop its processes and exit, waiting."""
        raise NotImplementedError

    def _disconnect(self) -> None:
        """Close this side of the connection to the daemon."""
        raise NotImplementedError

    def _tree(self) -> list[psutil.Process]:
        """Every process the daemon started (killed on close if still running)."""
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            return []

    def close(self) -> None:
        tree = self._tree()
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
        os.close(self.trigger)
        shutil.rmtree(self.dir, ignore_errors=True)


class Supervisord(Daemon):
    """A private supervisord, answering XML-RPC on its own unix socket."""

    NAME = "supervisord"
    MODULE = "supervisor.xmlrpc"
    SUBJECTS: ClassVar[dict[str, str]] = {
        "hot": "supervisord getProcessInfo() (XML-RPC, unix socket)",
        "cold": "supervisord startProcess(wait) + first line",
        "crash": "supervisord autorestart: crash -> first line again",
        "start": "supervisord startProcessGroup(wait) of {n} + first lines",
        "drain": "supervisord stopAllProcesses() of {n}",
    }

    def __init__(self, tmp: Path, setup: Setup, timeout: float) -> None:
        from supervisor.xmlrpc import SupervisorTransport  # type: ignore[import-untyped]

        super().__init__(tmp, setup, timeout)
        self.sock = self.dir / "supervisor.sock"
        conf = self.dir / "supervisord.conf"
        conf.write_text(self._config())
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
            then=hot_running if setup.hot_and_lazy else None,
        )

    def _program(self, name: str, options: str) -> str:
        command = " ".join(self.worker(name))
        return (
            f"[program:{name}]\ncommand={command}\nstartsecs=0\nstopwaitsecs=10\n"
            f"stdout_logfile=NONE\nstderr_logfile=NONE\n{options}"
        )

    def _config(self) -> str:
        parts = [
            f"[unix_http_server]\nfile={self.sock}\nchmod=0700\n",
            f"[supervisord]\nnodaemon=true\nlogfile={self.dir}/supervisord.log\n"
            f"pidfile={self.dir}/supervisord.pid\nchildlogdir={self.dir}\nloglevel=warn\n"
            f"minfds=8192\nminprocs=2048\n",
            "[rpcinterface:supervisor]\n"
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n",
        ]
        stopped = "autostart=false\nautorestart=false\n"
        if self.setup.hot_and_lazy:
            parts.append(self._program("hot", "autostart=true\nautorestart=false\n"))
            parts.append(self._program("lazy", stopped))
        if self.setup.group:
            parts.append(
                self._program(
                    "idle",
                    f"process_name=%(program_name)s_%(process_num)04d\n"
                    f"numprocs={self.setup.group}\n{stopped}",
                )
            )
        if self.setup.crash:
            parts.append(self._program("crash", "autostart=true\nautorestart=true\n"))
        return "\n".join(parts)

    def hot_per_call(self, calls: int, batches: int) -> tuple[list[float], int]:
        info = self.rpc.supervisor.getProcessInfo
        assert info("hot")["statename"] == "RUNNING"
        return per_call_us(info, ("hot",), calls, batches), calls

    def start_lazy(self) -> None:
        self.rpc.supervisor.startProcess("lazy", True)

    def stop_lazy(self) -> None:
        self.rpc.supervisor.stopProcess("lazy", True)

    def start_group(self) -> None:
        self.rpc.supervisor.startProcessGroup("idle", True)

    def stop_group(self) -> None:
        self.rpc.supervisor.stopAllProcesses(True)

    def _quit(self) -> None:
        self.rpc.supervisor.shutdown()

    def _disconnect(self) -> None:
        self._transport.close()


class Circusd(Daemon):
    """A private circusd, answering on its own ZeroMQ ipc endpoint."""

    NAME = "circus"
    MODULE = "circus.client"
    SUBJECTS: ClassVar[dict[str, str]] = {
        "hot": "circus status (ZeroMQ, ipc)",
        "cold": "circus start(waiting) + first line",
        "crash": "circus respawn: crash -> first line again",
        "start": "circus start(waiting) of a watcher of {n} + first lines",
        "drain": "circus stop(waiting) of a watcher of {n}",
    }

    def __init__(self, tmp: Path, setup: Setup, timeout: float) -> None:
        from circus.client import CircusClient  # type: ignore[import-untyped]

        super().__init__(tmp, setup, timeout)
        endpoint = f"ipc://{self.dir}/endpoint"
        ini = self.dir / "circus.ini"
        ini.write_text(self._config(endpoint))
        self._launch([sys.executable, "-c", "from circus.circusd import main; main()", str(ini)])
        self.client = CircusClient(endpoint=endpoint, timeout=timeout)

        def answers() -> bool:
            try:
                if setup.hot_and_lazy:
                    return self.call("status", name="hot").get("status") == "active"
                return bool(self.call("list"))
            except Exception:  # not listening yet
                return False

        self._wait_up(answers, "circusd", "circus.log", poll=0.05)

    def _watcher(self, name: str, options: str) -> str:
        _, *args = self.worker(name)
        return (
            f"[watcher:{name}]\ncmd = {sys.executable}\nargs = {' '.join(args)}\n"
            f"copy_env = True\n{options}"
        )

    def _config(self, endpoint: str) -> str:
        parts = [
            f"[circus]\nendpoint = {endpoint}\npubsub_endpoint = ipc://{self.dir}/pubsub\n"
            f"statsd = False\nloglevel = WARNING\nlogoutput = {self.dir}/circus.log\n"
        ]
        if self.setup.hot_and_lazy:
            parts.append(self._watcher("hot", "numprocesses = 1\nautostart = True\n"))
            parts.append(self._watcher("lazy", "numprocesses = 1\nautostart = False\n"))
        if self.setup.group:
            options = f"numprocesses = {self.setup.group}\nautostart = False\n"
            parts.append(self._watcher("idle", options))
        if self.setup.crash:
            parts.append(self._watcher("crash", "numprocesses = 1\nautostart = True\n"))
        return "\n".join(parts)

    def call(self, command: str, **properties: Any) -> dict[str, Any]:
        reply: dict[str, Any] = self.client.call({"command": command, "properties": properties})
        if reply.get("status") == "error":
            raise RuntimeError(f"circus {command}: {reply}")
        return reply

    def hot_per_call(self, calls: int, batches: int) -> tuple[list[float], int]:
        status = functools.partial(self.call, "status", name="hot")
        assert status()["status"] == "active"
        return per_call_us(status, (), calls, batches), calls

    def start_lazy(self) -> None:
        self.call("start", name="lazy", waiting=True)

    def stop_lazy(self) -> None:
        self.call("stop", name="lazy", waiting=True)

    def start_group(self) -> None:
        self.call("start", name="idle", waiting=True)

    def stop_group(self) -> None:
        self.call("stop", name="idle", waiting=True)

    def _quit(self) -> None:
        self.call("quit", waiting=True)

    def _disconnect(self) -> None:
        with contextlib.suppress(Exception):
            self.client.stop()


class Pm2(Daemon):
    """A private pm2 daemon (PM2_HOME in the temp dir, so a user's pm2 is never
    touched), driven through pm2's programmatic API by one node process
    (pm2_driver.js) that answers JSON lines on a pipe; its apps are the same
    Python workers (interpreter: this Python, out/err to /dev/null). pm2 is
    installed from the npm registry into .bench-node by ./scripts/bench."""

    NAME = "pm2"
    SUBJECTS: ClassVar[dict[str, str]] = {
        "hot": "pm2 describe() (in its node client, axon rpc)",
        "cold": "pm2 start() of a stopped app + first line",
        "crash": "pm2 autorestart (restart_delay 0): crash -> first line again",
        "start": "pm2 start({{instances: {n}}}) + first lines",
        "drain": "pm2 stop() of {n} instances",
    }
    HOT_CALLS = 10  # describe() costs milliseconds: fewer calls per batch

    @classmethod
    def unavailable(cls) -> str | None:
        if shutil.which("node") is None:
            return "node is not on the PATH"
        if not (PM2_MODULE / "package.json").exists():
            return f"pm2 is not installed in {PM2_PREFIX} (./scripts/bench installs it)"
        return None

    def __init__(self, tmp: Path, setup: Setup, timeout: float) -> None:
        super().__init__(tmp, setup, timeout)
        self.home = self.dir / "home"
        env = {**os.environ, "PM2_HOME": str(self.home)}
        env.pop("PM2_CONCURRENT_ACTIONS", None)  # pm2's defaults
        self._launch(
            ["node", str(PM2_DRIVER), str(PM2_MODULE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        try:
            self._answer("connect")
            if setup.hot_and_lazy:  # declared by starting it: a stopped app is a started one
                self.request("start", self._app("hot"))
                self.request("start", self._app("lazy"))
                wait_readable(self.fifo, timeout, "pm2's lazy worker's first line")
                self.stop_lazy()
            if setup.crash:
                self.request("start", self._app("crash"))
        except BaseException:
            self.close()
            raise

    def _app(self, name: str, instances: int = 1) -> dict[str, Any]:
        """pm2's options of a `name` app: pm2's defaults but no restart but for
        "crash" (at once, however often: restart_delay 0, min_uptime 0), and no
        tree kill (the workers have no children: pm2 would list them with ps at
        every stop)."""
        _, script, *args = self.worker(name)
        app: dict[str, Any] = {
            "name": name,
            "script": script,
            "args": args,
            "interpreter": sys.executable,
            "exec_mode": "fork",
            "instances": instances,
            "autorestart": name == "crash",
            "treekill": False,
            "kill_signal": "SIGTERM",
            "out_file": "/dev/null",
            "error_file": "/dev/null",
        }
        if name == "crash":
            app.update(restart_delay=0, min_uptime=0, max_restarts=1_000_000)
        return app

    def _answer(self, op: str) -> Any:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], self.timeout)
        line = self.process.stdout.readline() if ready else b""
        if not line:
            why = "exited" if self.process.poll() is not None else f"no answer in {self.timeout}s"
            raise RuntimeError(f"pm2 driver, {op}: {why} (pm2's log: {self.home}/pm2.log)")
        reply = json.loads(line)
        if not reply["ok"]:
            raise RuntimeError(f"pm2 {op}: {reply['error'][:500]}")
        return reply["value"]

    def request(self, op: str, *args: Any) -> Any:
        """One request to the driver, and its answer."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, "args": args}).encode() + b"\n")
        self.process.stdin.flush()
        return self._answer(op)

    def hot_per_call(self, calls: int, batches: int) -> tuple[list[float], int]:
        calls = min(calls, self.HOT_CALLS)
        self.request("repeat", calls, "hot")  # the warm-up batch
        return [float(self.request("repeat", calls, "hot")) for _ in range(batches)], calls

    def start_lazy(self) -> None:
        self.request("start", "lazy")

    def stop_lazy(self) -> None:
        self.request("stop", "lazy")

    def start_group(self) -> None:
        self.request("start", self._app("idle", self.setup.group))

    def stop_group(self) -> None:
        self.request("stop", "idle")

    def forget_group(self) -> None:
        """pm2 delete(): start_group() declares the app anew."""
        self.request("delete", "idle")

    def supervisor_pid(self) -> int:
        return int((self.home / "pm2.pid").read_text())

    def _tree(self) -> list[psutil.Process]:
        """The driver's tree, and the pm2 daemon's (it leaves the driver's tree
        if the driver dies first)."""
        tree = super()._tree()
        with contextlib.suppress(OSError, ValueError, psutil.Error):
            god = psutil.Process(self.supervisor_pid())
            tree += [god, *god.children(recursive=True)]
        return tree

    def _quit(self) -> None:
        """Kill the driver: close() then kills the daemon and its processes
        (pm2's own killDaemon() stops them two at a time, 100 ms polls each:
        more than a minute for 1,000; its PM2_HOME goes with the temp dir)."""
        self.process.kill()

    def _disconnect(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


PEERS: tuple[type[Daemon], ...] = (Supervisord, Circusd, Pm2)


_REASONS: dict[type[Daemon], str | None] = {}  # unavailable(), asked once a run


def peer_available(bench: Bench, kind: type[Daemon]) -> bool:
    """Whether `kind` can run here; if not, the reason is printed (once a run)."""
    if not bench.config.peers:
        bench.skip("the peers (supervisord, circus, pm2)", "--no-peers", once=True)
        return False
    if kind not in _REASONS:
        _REASONS[kind] = kind.unavailable()
    reason = _REASONS[kind]
    if reason is not None:
        bench.skip(kind.NAME, reason, once=True)
        return False
    return True


@contextlib.contextmanager
def peer(bench: Bench, kind: type[Daemon], what: str, setup: Setup) -> Iterator[Daemon | None]:
    """Start a peer daemon for a block, or yield None (skipped, with the reason
    printed) when it is not installed or cannot run here."""
    if not peer_available(bench, kind):
        yield None
        return
    try:
        daemon = kind(bench.tmp, setup, bench.config.peer_timeout_s)
    except Exception as exc:
        bench.skip(what, f"it could not be started here: {type(exc).__name__}: {exc}")
        yield None
        return
    try:
        yield daemon
    finally:
        daemon.close()
