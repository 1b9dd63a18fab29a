"""`Pool`: the pool of background workers owned by this process.

The owner starts the supervisor process, watches it (a thread waits on its
pidfd, so its unexpected death closes the pool and kills what it leaves), serves
metrics if asked, and on `shutdown()` drains everything and removes whatever
the supervisor could not. Every other call is `PoolClient`'s.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .. import naming, platform, texts
from ..declarations import PoolConfig, WorkerSpec
from ..errors import BgpoolError, PoolClosed, StartupError
from ..launch import python_command
from ..models import ReloadReport
from ..shm import varstore
from ..shm.table import mark_closed, new_name
from .client import REPLY_MARGIN, PoolClient

if TYPE_CHECKING:
    from .metrics import HealthServer

FIXED_SETTINGS = (
    "start_method",
    "metrics_port",
    "metrics_host",
    "root",
    "name",
    "coordinator",
    "lease_ttl",
)
"""The settings `reload()` cannot change: the supervisor, its coordinator or the
metrics server were set up with them (and the code of instances already running
was found under the root)."""

POOL_MARK = "BGPOOL_POOL"
"""Environment variable that marks every process of one pool (its value is the
pool's address)."""


def private_address() -> str:
    """A control-socket path in a fresh private (0700) directory, which the
    supervisor binds and removes."""
    return os.path.join(tempfile.mkdtemp(prefix="bgpool-"), "control.sock")


def _cannot_start(exc: OSError) -> str:
    """StartupError's message when this process could not make what a pool needs."""
    return f"could not start the pool: {platform.os_error_words(exc)}"


class Pool(PoolClient):
    """A pool of background workers owned by this process.

    `start()` launches the supervisor (a fresh interpreter in its own process
    group, so a terminal's Ctrl-C reaches the application, which decides) and
    returns once every eager worker is ready. `shutdown()` drains everything and
    leaves nothing behind. Usable as a context manager.

    `supervisor_output=(stdout_fd, stderr_fd)` sends the supervisor's stdout and
    stderr (its log, and with them every worker's output, relayed or inherited)
    to those file descriptors instead of this process's own stdout and stderr:
    for an application that shows worker output itself, such as `bgpool run`'s
    live table, which prints it above the table from the read ends of two pipes.
    `start()` hands the supervisor copies, so the caller may close its own once
    `start()` returns; a pipe's read end then sees EOF when the supervisor and
    its workers are gone.

    `colour_labels=True` colours the label of every relayed worker line (one
    colour per worker, as honcho does) and `timestamps=True` prefixes each with
    the time it was relayed (`12:03:07 job.0 | ...`): what `bgpool run` asks
    for on a terminal, and with `--timestamps`.
    """

    def __init__(
        self,
        config: PoolConfig | Sequence[WorkerSpec],
        *,
        supervisor_output: tuple[int, int] | None = None,
        colour_labels: bool = False,
        timestamps: bool = False,
    ) -> None:
        if not isinstance(config, PoolConfig):
            config = PoolConfig(workers=list(config))
        if supervisor_output is not None and not (
            isinstance(supervisor_output, tuple)
            and len(supervisor_output) == 2
            and all(type(fd) is int for fd in supervisor_output)
        ):
            raise TypeError(
                "supervisor_output must be a (stdout_fd, stderr_fd) tuple of two ints, "
                f"not {supervisor_output!r}"
            )
        self.config = config
        self._detached("", config.ensure_timeout)
        self._name = config.name
        # Its own supervisor: a socket that does not answer means it stopped,
        # or has not started (`_closed()` says which), never "no pool there".
        self._reached = True
        self._name_lock: naming.NameLock | None = None  # a named pool's, until start() ends
        self._process: subprocess.Popen[bytes] | None = None
        self._watcher: threading.Thread | None = None
        self._pidfd: int | None = None
        self._closing = False
        self._closed_for_good = False
        self._shutdown_lock = threading.RLock()
        self._pidfd_lock = threading.Lock()  # `_skip_grace()` from another thread
        self._attached = False  # start() mapped the table
        self._owner_pid = os.getpid()
        self._health: HealthServer | None = None
        self._stdio: tuple[int | None, int | None] = supervisor_output or (None, None)
        self._colour_labels = bool(colour_labels)
        self._timestamps = bool(timestamps)

    def _closed(self) -> BgpoolError:
        if self._process is None and not self._closing:
            return BgpoolError("the pool is not started: call start() first")
        if self._closing and not self._closed_for_good and not self._gone:
            return PoolClosed(texts.SHUTTING_DOWN)
        if not self._attached and not self._closing and not self._gone:
            return BgpoolError("the pool is still starting: call again once start() returns")
        return super()._closed()

    def _bootstrap(self, boot_fd: int) -> bytes:
        return json.dumps(
            {
                "owner_pid": os.getpid(),
                "boot_fd": boot_fd,
                "name_lock": (
                    {"directory": self._name_lock.directory, "fd": self._name_lock.fd}
                    if self._name_lock is not None
                    else None
                ),
                "table": self._table_name,
                "sys_path": [os.path.abspath(p) for p in sys.path],
                "workers": self.config.worker_messages(),
                "settings": self.config.settings_message(),
                "relay": {"colour": self._colour_labels, "timestamps": self._timestamps},
            }
        ).encode()

    def _take_config_reloads(self) -> None:
        """Tell the supervisor that SIGHUP makes this process load its config
        file again (`bgpool run` does), so `bgpool reload` may ask for it."""
        self._request({"op": "owner_reloads"}, timeout=10.0)

    def _config_reloaded(self, ok: bool, message: str) -> None:
        """Tell `bgpool reload` callers how a config reload went."""
        self._request({"op": "config_reloaded", "ok": ok, "message": message}, timeout=10.0)

    def reload(self, config: PoolConfig) -> ReloadReport:
        """Apply a new set of declarations to the running pool, as
        `supervisorctl update` does: new ones are added (eager ones started and
        waited for), removed ones drained (their names are undeclared at once),
        changed ones (any field) restarted with the new settings, rolling,
        unchanged ones left running; the live settings change. Nothing changes
        if a setting that cannot change live differs (`ValueError` naming it),
        or if a new or changed worker's code fails to load or its function
        does not exist (`WorkerBootFailed`)."""
        if not isinstance(config, PoolConfig):
            raise TypeError(f"config must be a PoolConfig, not {type(config).__name__}")
        for name in FIXED_SETTINGS:
            if getattr(config, name) != getattr(self.config, name):
                raise ValueError(
                    f"{name} cannot change while the pool runs "
                    f"({getattr(self.config, name)!r} -> {getattr(config, name)!r}); "
                    "nothing was changed"
                )
        self._reader()
        message = {
            "op": "reload",
            "workers": config.worker_messages(),
            "settings": config.settings_message(),
        }
        reply = self._request(message, timeout=None)
        self.config = config
        self._ensure_timeout = config.ensure_timeout
        return ReloadReport(**reply["report"])

    def start(self) -> None:
        """Start the supervisor and every eager worker; return once each eager
        worker is ready (for a pool, its first ready instance). Raises
        `StartupError`, with nothing left running, if a declaration's target
        function does not exist (before any worker starts), or an eager
        instance is aborted or `ensure_timeout` passes first."""
        if self._process is not None or self._closing:
            raise BgpoolError("a Pool can be started only once")
        self._owner_pid = os.getpid()
        platform.fill_closed_stdio()  # no descriptor of ours may land on 0-2
        if self.config.metrics_port is not None:  # first: a port in use starts nothing
            self._serve_metrics(self.config.metrics_host, self.config.metrics_port)
        try:
            self._address = self._claim_address()
            boot_r, boot_w = os.pipe()
        except OSError as exc:
            self._stop_metrics()
            self._release_address()
            raise StartupError(_cannot_start(exc)) from None
        atexit.register(self.shutdown)  # a pool left running is drained at exit
        self._table_name = new_name()  # ours to remove, whatever becomes of the supervisor
        try:
            self._process = subprocess.Popen(
                python_command("bgpool.supervisor.main", "main"),
                stdin=subprocess.PIPE,
                stdout=self._stdio[0],
                stderr=self._stdio[1],
                pass_fds=(boot_w,) + ((self._name_lock.fd,) if self._name_lock else ()),
                process_group=0,
                # BGPOOL_POOL marks the supervisor and everything it starts (and
                # only that: the application's own processes get BGPOOL_ADDRESS
                # alone), visibly in /proc/<pid>/environ, for the straggler sweep.
                env={**os.environ, "BGPOOL_ADDRESS": self._address, POOL_MARK: self._address},
            )
            self._pidfd = platform.pidfd_open(self._process.pid)
            self._watcher = threading.Thread(
                target=self._watch_supervisor, name="bgpool-watcher", daemon=True
            )
            self._watcher.start()
            os.close(boot_w)
            assert self._process.stdin is not None
            with self._process.stdin as stdin:
                stdin.write(self._bootstrap(boot_w))
            self._hand_over_name()
            self._read_boot(boot_r)
        except BaseException as exc:
            if self._process is None:
                self._release_address()
                self._stop_metrics()
            self.shutdown()
            if isinstance(exc, OSError):
                raise StartupError(_cannot_start(exc)) from None
            raise
        finally:
            os.close(boot_r)
        try:
            # it answers once it has loaded the targets' code: an import may
            # take as long as a worker's boot
            self._attach(self.config.ensure_timeout + REPLY_MARGIN)
            self._attached = True
            os.environ["BGPOOL_ADDRESS"] = self._address
            self._request({"op": "start"}, timeout=self.config.ensure_timeout + REPLY_MARGIN)
        except BaseException:
            self.shutdown()
            raise

    def _claim_address(self) -> str:
        """Where the supervisor will listen: a fresh private directory's socket,
        or a named pool's, once this process holds the name (`StartupError`
        while another pool runs under it)."""
        if self.config.name is None:
            return private_address()
        try:
            self._name_lock = naming.NameLock.take(self.config.name)
        except BgpoolError as exc:
            raise StartupError(f"could not start the pool: {exc}", []) from None
        return self._name_lock.address

    def _release_address(self) -> None:
        """Undo `_claim_address()` when no supervisor was started."""
        if self._name_lock is not None:
            self._name_lock.release()
        elif self._address:
            shutil.rmtree(os.path.dirname(self._address), ignore_errors=True)

    def _hand_over_name(self) -> None:
        """The supervisor holds the pool's name from now on (it inherited the
        lock's descriptor): say who holds it, and close this process's copy,
        so the name is free once the supervisor is gone."""
        lock = self._name_lock
        if lock is not None and lock.fd >= 0:
            assert self._process is not None
            try:
                lock.record(os.getpid(), self._process.pid)
            finally:
                lock.close()

    def _watch_supervisor(self) -> None:
        """Runs in a thread of the owner: wait for the supervisor to end, reap
        it, and close the pool (every later call raises `PoolClosed`, even one
        the table could answer). If it did not end cleanly (killed, or crashed,
        even in the middle of a shutdown), its workers got SIGKILL from their
        parent-death signal but what they forked did not: kill every process
        that still carries this pool's mark. Then remove the shared-memory
        names and the control socket's files at once (clients keep their
        mappings): an application killed before it calls `shutdown()` must not
        leave them behind."""
        assert self._process is not None and self._pidfd is not None
        select.select([self._pidfd], [], [])
        status = platform.exit_status(self._pidfd)  # None: the application reaped it
        self._process.wait()
        self._gone = True
        if self._table_name:  # its clients, in every process, must hear it from the table
            mark_closed(self._table_name)
        if status != 0:
            stragglers = platform.processes_with_env(POOL_MARK, self._address)
            platform.signal_tree(stragglers, signal.SIGKILL)
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Remove the table and the vars segments and the control socket's
        files, if the supervisor did not (it died, even mid-start): an unnamed
        pool's private directory; a named pool's socket and pid file, unless
        a pool that took the name over holds them now."""
        if self._table_name:
            platform.unlink_shm(self._table_name)
            varstore.remove_all(self._table_name)
        if self._name_lock is not None:
            naming.clear_stale(self._name_lock.directory)
        elif self._address:
            shutil.rmtree(os.path.dirname(self._address), ignore_errors=True)

    def _signal_supervisor(self, sig: signal.Signals) -> None:
        """Signal the supervisor through its pidfd: never another process that
        reused its pid after it was reaped."""
        assert self._pidfd is not None
        platform.pidfd_send_signal(self._pidfd, sig)

    def _skip_grace(self) -> None:
        """Cut a drain's grace period short (`bgpool run`'s second SIGINT or
        SIGTERM): the supervisor sends SIGTERM to every remaining worker's tree
        now, SIGKILL a second later. Safe from any thread, during `shutdown()`;
        does nothing once the supervisor is gone. SIGQUIT, not a second SIGTERM:
        a service manager may SIGTERM the supervisor itself as well as us."""
        with self._pidfd_lock:
            if self._pidfd is not None:
                platform.pidfd_send_signal(self._pidfd, signal.SIGQUIT)

    def _serve_metrics(self, host: str, port: int) -> None:
        from .metrics import HealthServer

        try:
            self._health = HealthServer(self, host, port)
        except (OSError, OverflowError) as exc:
            words = platform.os_error_words(exc) if isinstance(exc, OSError) else str(exc)
            raise StartupError(
                f"could not start the pool: cannot serve metrics on {host}:{port}: {words}"
            ) from None

    def _stop_metrics(self) -> None:
        if self._health is not None:  # closing twice is harmless
            self._health.close()

    @property
    def metrics_port(self) -> int | None:
        """The port the metrics, probes and status page are served on (the
        actual one when `metrics_port=0` asked for any free port)."""
        return self._health.port if self._health is not None else None

    def _read_boot(self, boot_r: int) -> None:
        """Wait for the supervisor's first words: ready to serve (with the table
        made), or why it could not start (`StartupError`)."""
        data = b""
        while not data.endswith(b"\n"):
            ready, _, _ = select.select([boot_r], [], [], self.config.ensure_timeout)
            chunk = os.read(boot_r, 4096) if ready else b""
            if not chunk:
                raise StartupError(
                    "could not start the pool: the supervisor process "
                    + ("did not start in time" if not ready else "exited during start-up")
                    + " (its error, if any, is on stderr)"
                )
            data += chunk
        info: dict[str, str] = json.loads(data)
        if "error" in info:
            raise StartupError(f"could not start the pool: {info['error']}")

    def shutdown(self) -> None:
        """Drain every worker (EOF on its handle), force-kill after
        `grace_period`, and remove the table, socket and directory. Idempotent;
        a call made while another thread shuts the pool down returns once the
        pool is closed."""
        if os.getpid() != self._owner_pid:
            # A forked child (a gunicorn worker, say) inherited this Pool: the
            # supervisor is its parent's to stop. Only let go of our mappings.
            self.close()
            return
        with self._shutdown_lock:  # re-entrant: an atexit or signal-handler call returns
            if self._process is None or self._closing:
                return
            self._closing = True
            self._shut_down()

    def _shut_down(self) -> None:
        """SIGTERM to the supervisor (it drains), SIGKILL if it outlives the
        grace period by far, then remove whatever it could not."""
        atexit.unregister(self.shutdown)
        assert self._watcher is not None and self._pidfd is not None
        self._signal_supervisor(signal.SIGTERM)
        self._watcher.join(timeout=self.config.grace_period + REPLY_MARGIN)
        if self._watcher.is_alive():
            self._signal_supervisor(signal.SIGKILL)  # workers follow: parent-death signal
            self._watcher.join()
        with self._pidfd_lock:
            os.close(self._pidfd)
            self._pidfd = None
        self._stop_metrics()
        self.close()
        if self._name_lock is not None:  # ours, if the supervisor died before it was handed over
            self._name_lock.close()
        self._remove_leftovers()
        if self._address and os.environ.get("BGPOOL_ADDRESS") == self._address:
            del os.environ["BGPOOL_ADDRESS"]
        self._closed_for_good = True

    def __enter__(self) -> Pool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
