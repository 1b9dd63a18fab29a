"""`bgpool run CONFIG [-- COMMAND [ARG...]]`: start the pool a config file
declares and show its state until a signal stops it, or, given a COMMAND, run
it beside the pool and stop once it exits.

One thread waits on everything with a selector: the pool's state-change events
(`PoolClient.watch()`), a wake-up pipe the signal handlers write to, and, for the
live view, the read ends of the pipes the supervisor's stdout and stderr go to
(so worker output prints above the table instead of through it). A drain, and
a reload (SIGHUP, or `bgpool reload`), run in a second thread, so their events
still show as they happen; a reload's thread says it is done with a 0 byte on
the wake-up pipe (no signal has number 0).

COMMAND (`command.py`) gets the signals `bgpool run` receives; SIGCHLD tells
the loop that it, or an orphan, exited. With `NOTIFY_SOCKET` set, the steps
are told to the service manager (`notify.py`).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from .. import texts
from ..app.pool import Pool
from ..declarations import PoolConfig
from ..errors import BgpoolError, StartupError
from ..launch import TRANSITIONS_SHOWN
from .command import FORWARDED, NOT_EXECUTABLE, NOT_FOUND, Command
from .config import format_load_error, load_config
from .display import LiveView, PlainView, View, colour_labels, print_error
from .notify import Notifier, ReadyCount, Watchdog
from .wakeup import signal_wakeup

OPTIONS = {"metrics_port": "--metrics-port", "metrics_host": "--metrics-host"}
"""`bgpool run`'s options that set a `PoolConfig` field: field -> option."""

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def _heeded(signals: Iterable[signal.Signals]) -> list[signal.Signals]:
    """Those of `signals` that `bgpool run` was not started ignoring: one its
    starter ignores (a non-interactive shell starts an `&` job with SIGINT and
    SIGQUIT ignored) stays ignored, as in any program of such a job."""
    return [sig for sig in signals if signal.getsignal(sig) != signal.SIG_IGN]


def run(
    config_path: str,
    metrics_port: object,
    metrics_host: object,
    plain: bool,
    command: Sequence[str] = (),
    timestamps: bool = False,
) -> int:
    """`bgpool run`: start the pool, show its state, stop on a signal, or run
    COMMAND beside it and stop once it exits. Exits 0 after a drain (with
    COMMAND: its exit status, 128+N if a signal N killed it), 1 if start-up
    fails or the supervisor dies, 2 if an option is invalid or the config
    cannot be loaded; 127 (126) if COMMAND cannot be found (run). Worker lines
    carry their label, coloured on a terminal, and with `timestamps` the time
    they were relayed."""
    overrides = _checked_options({"metrics_port": metrics_port, "metrics_host": metrics_host})
    if overrides is None:
        return 2
    try:
        config = _load(config_path, overrides)
    except (Exception, SystemExit) as exc:  # sys.exit() in the file: no config either
        sys.stderr.write(format_load_error(exc))
        print(f"bgpool: cannot load {config_path}; nothing was started", file=sys.stderr)
        return 2
    notifier = Notifier.from_environment()
    # COMMAND shares the terminal: a table redrawn in place would garble its output
    live = sys.stdout.isatty() and not plain and not command
    view: View = LiveView() if live else PlainView()
    selector = selectors.DefaultSelector()
    # the live view prints the supervisor's output itself, above the table
    pipes = {target: os.pipe2(os.O_CLOEXEC) for target in (1, 2)} if live else {}
    for target, (read_end, _) in pipes.items():
        os.set_blocking(read_end, False)
        selector.register(read_end, selectors.EVENT_READ, ("output", target))
    output = (pipes[1][1], pipes[2][1]) if live else None
    pool = Pool(
        config,
        supervisor_output=output,
        colour_labels=colour_labels(live),
        timestamps=timestamps,
    )
    try:
        os.environ[TRANSITIONS_SHOWN] = "1"  # the view shows them: not in the log too
        try:
            with _interruptible():
                pool.start()
        finally:
            del os.environ[TRANSITIONS_SHOWN]
            for _, write_end in pipes.values():  # the supervisor holds its own copies now
                os.close(write_end)
        pool._take_config_reloads()
        session = _Session(pool, view, notifier, lambda: _reload(pool, config_path, overrides))
        return session.serve(selector, command)
    except StartupError as exc:
        print_error(exc)
        return 1
    except _Interrupted as exc:
        view.note(f"{exc.signal.name} during start-up: stopped")
        return 0
    finally:
        pool.shutdown()
        for key in list(selector.get_map().values()):
            if isinstance(key.fileobj, int):
                _drain_output(key.fileobj, key.data[1], view)
                os.close(key.fileobj)
        selector.close()
        view.close()
        if notifier is not None:
            notifier.close()


class _Interrupted(Exception):
    """A SIGTERM or SIGINT while the pool starts: the start is abandoned."""

    def __init__(self, sig: signal.Signals) -> None:
        super().__init__(sig.name)
        self.signal = sig


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """While the pool starts, SIGTERM and SIGINT abandon the start (`Pool.start()`
    leaves nothing running), the first one only: one that follows must not cut
    the clean-up short. The other signals of `FORWARDED` do nothing until the
    loop takes them (nobody to pass them to yet). Handlers, not SIG_IGN, which
    the supervisor would inherit through exec."""

    def ignore(_signum: int, _frame: object) -> None:
        pass

    def interrupt(signum: int, _frame: object) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, ignore)
        raise _Interrupted(signal.Signals(signum))

    previous = {
        sig: signal.signal(sig, interrupt if sig in STOP_SIGNALS else ignore)
        for sig in _heeded(FORWARDED)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _checked_options(options: Mapping[str, object]) -> dict[str, object] | None:
    """The options given, each validated (and converted) as the `PoolConfig`
    field it sets; None, with one line on stderr per bad option, if any is
    invalid."""
    given = {field: value for field, value in options.items() if value is not None}
    try:
        checked = PoolConfig.model_validate({"workers": [], **given})
    except ValidationError as exc:
        for error in exc.errors():
            field = str(error["loc"][0])
            print(
                f"bgpool run: {OPTIONS[field]} {given[field]}: {error['msg']} (PoolConfig.{field})",
                file=sys.stderr,
            )
        return None
    return {field: getattr(checked, field) for field in given}


def _load(path: str, overrides: Mapping[str, object]) -> PoolConfig:
    """The config file's `config`, with the command line's settings on top."""
    config = load_config(path)
    return config.model_copy(update=overrides)


def _reload(pool: Pool, path: str, overrides: Mapping[str, object]) -> tuple[bool, str]:
    """SIGHUP: load the config file afresh, apply it, then restart every worker
    on new code. Whether that worked, and what it did or why not."""
    try:
        config = _load(path, overrides)
    except (Exception, SystemExit) as exc:  # sys.exit() in the file: this thread would end
        return False, f"cannot load {path} ({type(exc).__name__}: {exc}); nothing was changed"
    try:
        report = pool.reload(config)
    except (BgpoolError, ValueError) as exc:
        return False, f"cannot apply {path} ({type(exc).__name__}: {exc}); nothing was changed"
    done = ", ".join(
        f"{what} {' '.join(labels)}"
        for what, labels in report.model_dump().items()
        if labels and what != "unchanged"
    )
    applied = f"applied {path}" + (f" ({done})" if done else " (no declaration changed)")
    try:
        pool.restart_workers()
    except BgpoolError as exc:
        return False, f"{applied}, but restarting the workers failed: {exc}"
    return True, f"{applied}; every worker restarted on new code"


def _drain_output(fd: int, target: int, view: View) -> bool:
    """Show what the supervisor wrote to `fd`; False at its end."""
    try:
        data = os.read(fd, 65536)
    except BlockingIOError:
        return True
    if data:
        view.output(target, data)
    return bool(data)


class _Session:
    """The started pool, shown until it is drained or its supervisor dies.
    Without COMMAND, SIGTERM and SIGINT drain it; with one, every signal of
    `FORWARDED` goes to COMMAND and COMMAND's exit drains the pool. SIGHUP
    `reload()`s it. A SIGTERM or SIGINT during the drain skips the rest of
    its grace period."""

    def __init__(
        self,
        pool: Pool,
        view: View,
        notifier: Notifier | None,
        reload: Callable[[], tuple[bool, str]],
    ) -> None:
        self.pool = pool
        self.view = view
        self.notifier = notifier
        self.reload = reload
        self.command: Command | None = None
        self.stopper: threading.Thread | None = None
        self.reloader: threading.Thread | None = None
        self.outcome: list[tuple[bool, str]] = []
        self.hurried = False
        self.status = 0  # what `bgpool run` exits with
        self.count = ReadyCount(pool.status())

    def serve(self, selector: selectors.BaseSelector, command: Sequence[str]) -> int:
        """Show the pool until it is drained (the exit status: 0, or
        COMMAND's) or its supervisor dies (1)."""
        with signal_wakeup() as (wake_r, self.wake_w):
            return self._serve(selector, command, wake_r)

    def _serve(self, selector: selectors.BaseSelector, command: Sequence[str], wake_r: int) -> int:
        watch = self.pool.watch()
        heeded = _heeded(FORWARDED if command else (*STOP_SIGNALS, signal.SIGHUP))
        caught = (*heeded, signal.SIGCHLD) if command else heeded
        handlers = {s: signal.signal(s, lambda *_: None) for s in caught}
        watchdog: Watchdog | None = None
        try:
            port = self.pool.metrics_port
            metrics = f", metrics on port {port}" if port else ""
            self.view.note(f"pool running, BGPOOL_ADDRESS={self.pool.address}{metrics}")
            self.view.started(self.pool)
            selector.register(watch, selectors.EVENT_READ, ("watch", 0))
            selector.register(wake_r, selectors.EVENT_READ, ("signal", 0))
            if command:
                self._start_command(command)
            if self.notifier is not None and self.stopper is None:
                self.notifier.status(self.count.text())
                self.notifier.ready()
                if self.notifier.watchdog_interval is not None:
                    ping = self.pool._ping
                    watchdog = Watchdog(self.notifier, self.notifier.watchdog_interval, ping)
            while True:
                for key, _ in selector.select():
                    kind, target = key.data
                    if kind == "output":
                        if not _drain_output(key.fd, target, self.view):
                            selector.unregister(key.fd)
                            os.close(key.fd)
                    elif kind == "signal":
                        if self._on_signals(set(os.read(wake_r, 64))):
                            return self.status
                    else:
                        events = watch.events()
                        if events is None:
                            selector.unregister(watch)
                            if self._on_supervisor_exit():
                                return self.status
                            continue
                        self._on_events(events)
        finally:
            if watchdog is not None:
                watchdog.close()
            for thread in (self.stopper, self.reloader):
                if thread is not None:
                    thread.join()
            if self.command is not None:
                self.command.reap(self._supervisor())
            with contextlib.suppress(KeyError):
                selector.unregister(watch)
            selector.unregister(wake_r)
            watch.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _start_command(self, argv: Sequence[str]) -> None:
        """Run COMMAND (`BGPOOL_ADDRESS` is in our environment now); if it
        cannot be run, say so and drain the pool."""
        try:
            self.command = Command(argv, os.environ)
        except OSError as exc:
            print(f"bgpool: cannot run {argv[0]}: {exc.strerror}", file=sys.stderr)
            self.status = NOT_FOUND if isinstance(exc, FileNotFoundError) else NOT_EXECUTABLE
            self._stop()
            return
        self.view.note(f"started {self.command.name} (pid {self.command.pid})")

    def _supervisor(self) -> set[int]:
        """The supervisor's pid: a child of ours that is the pool's to reap."""
        process = self.pool._process
        return {process.pid} if process is not None else set()

    def _on_signals(self, received: set[int]) -> bool:
        """Act on the signals that arrived (and a reload's end, 0); True once
        `bgpool run` is done."""
        command = self.command
        if command is not None:
            for sig in sorted(received & set(FORWARDED)):
                command.forward(sig)
            if signal.SIGCHLD in received and command.reap(self._supervisor()):
                ended = f"{command.name} ended ({texts.exit_words(command.returncode)})"
                if self.pool._gone and self.stopper is None:  # the pool died: exit 1
                    self.status = 1
                    self.view.note(ended)
                    return True
                self.status = command.status or 0
                self.view.note(f"{ended}; stopping the pool")
                self._stop()
        stop = received & STOP_SIGNALS
        if stop and self.stopper is not None:
            self._skip_grace(signal.Signals(min(stop)))
        elif stop and command is None:
            self.view.note("stopping (draining workers)")
            self._stop()
        if signal.SIGHUP in received and self.stopper is None:
            if self.reloader is not None:
                self.view.note("SIGHUP: a reload is running already")
            else:
                self.view.note("SIGHUP: loading the config file again")
                if self.notifier is not None:
                    self.notifier.reloading()
                self.reloader = threading.Thread(target=self._reload_in_background)
                self.reloader.start()
        if 0 in received and self.reloader is not None:
            self.reloader.join()
            self.reloader = None
            ok, text = self.outcome.pop()
            self.view.note(text)
            if not ok:
                print(f"bgpool: {text}", file=sys.stderr)
            with contextlib.suppress(BgpoolError):
                self.pool._config_reloaded(ok, text)
            if self.notifier is not None:
                self.notifier.ready()
        return False

    def _reload_in_background(self) -> None:
        try:
            self.outcome.append(self.reload())
        except Exception as exc:  # a bug: said, and the pool goes on
            self.outcome.append((False, f"reload failed: {type(exc).__name__}: {exc}"))
        os.write(self.wake_w, b"\0")

    def _stop(self) -> None:
        """Drain the pool, in the background so the drain's events still show."""
        if self.stopper is not None:
            return
        if self.notifier is not None:
            self.notifier.stopping()
        self.stopper = threading.Thread(target=self.pool.shutdown)
        self.stopper.start()

    def _skip_grace(self, sig: signal.Signals) -> None:
        """A SIGTERM or SIGINT during the drain: every remaining worker gets
        SIGTERM now, SIGKILL a second later."""
        if self.hurried:
            return
        self.hurried = True
        print(
            f"bgpool: {sig.name} during the drain: skipping the rest of the grace period "
            "(SIGTERM to every remaining worker now, SIGKILL 1s later)",
            file=sys.stderr,
            flush=True,
        )
        self.pool._skip_grace()

    def _on_supervisor_exit(self) -> bool:
        """The supervisor is gone: after our drain, done; otherwise it died,
        and COMMAND, if running, is asked to stop (SIGTERM) and waited for.
        True once `bgpool run` is done."""
        if self.stopper is not None:
            self.stopper.join()
            self.view.note("stopped")
            return True
        self.status = 1
        command = self.command
        if command is None or command.returncode is not None:
            self.view.note("the supervisor exited")
            return True
        self.view.note(f"the supervisor exited: SIGTERM to {command.name}, waiting for it")
        command.forward(signal.SIGTERM)
        return False

    def _on_events(self, events: list[dict[str, Any]]) -> None:
        for e in events:
            self.view.event(e["worker"], e["scope"], e["instance"], e["state"], e["detail"])
        if self.notifier is not None:
            try:
                self.count.refresh(self.pool.status())
            except BgpoolError:  # draining: the table no longer answers
                self.count.update(events)
            self.notifier.status(self.count.text())
