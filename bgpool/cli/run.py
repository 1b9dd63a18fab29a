"""`bgpool run CONFIG`: start the pool a config file declares and show its state
until a signal stops it.

One thread waits on everything with a selector: the pool's state-change events
(`PoolClient.watch()`), a wake-up pipe the signal handlers write to, and, for the
live view, the read ends of the pipes the supervisor's stdout and stderr go to
(so worker output prints above the table instead of through it). A drain, and
a reload (SIGHUP, or `bgpool reload`), run in a second thread, so their events
still show as they happen; a reload's thread says it is done with a 0 byte on
the wake-up pipe (no signal has number 0).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Mapping

from ..app.pool import Pool
from ..declarations import PoolConfig
from ..errors import BgpoolError, StartupError
from .config import load_config
from .display import LiveView, PlainView, View, colour_labels, print_error


def run(
    config_path: str,
    metrics_port: int | None,
    metrics_host: str | None,
    plain: bool,
    timestamps: bool = False,
) -> int:
    """`bgpool run`: start the pool, show its state, stop on a signal. Exits 0
    after a drain, 1 if start-up fails or the supervisor dies, 2 if the config
    cannot be loaded. Worker lines carry their label, coloured on a terminal,
    and with `timestamps` the time they were relayed."""
    overrides = {"metrics_port": metrics_port, "metrics_host": metrics_host}
    try:
        config = _load(config_path, overrides)
    except Exception:
        traceback.print_exc()
        print(f"bgpool: cannot load {config_path}; nothing was started", file=sys.stderr)
        return 2
    live = sys.stdout.isatty() and not plain
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
        try:
            pool.start()
        finally:
            for _, write_end in pipes.values():  # the supervisor holds its own copies now
                os.close(write_end)
        pool._take_config_reloads()
        return _serve(pool, view, selector, lambda: _reload(pool, config_path, overrides))
    except StartupError as exc:
        print_error(exc)
        return 1
    finally:
        pool.shutdown()
        for key in list(selector.get_map().values()):
            if isinstance(key.fileobj, int):
                _drain_output(key.fileobj, key.data[1], view)
                os.close(key.fileobj)
        selector.close()
        view.close()


def _load(path: str, overrides: Mapping[str, object]) -> PoolConfig:
    """The config file's `config`, with the command line's settings on top."""
    config = load_config(path)
    return config.model_copy(update={k: v for k, v in overrides.items() if v is not None})


def _reload(pool: Pool, path: str, overrides: Mapping[str, object]) -> tuple[bool, str]:
    """SIGHUP: load the config file afresh, apply it, then restart every worker
    on new code. Whether that worked, and what it did or why not."""
    try:
        config = _load(path, overrides)
    except Exception as exc:
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


def _serve(
    pool: Pool,
    view: View,
    selector: selectors.BaseSelector,
    reload: Callable[[], tuple[bool, str]],
) -> int:
    """Show the started pool until it is drained (0) or its supervisor dies (1).
    SIGTERM and SIGINT drain it; SIGHUP `reload()`s it."""
    watch = pool.watch()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    previous = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    handlers = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT,
                                                               signal.SIGHUP)}  # fmt: skip
    stopper: threading.Thread | None = None
    reloader: threading.Thread | None = None
    outcome: list[tuple[bool, str]] = []

    def reload_in_background() -> None:
        try:
            outcome.append(reload())
        except Exception as exc:  # a bug: said, and the pool goes on
            outcome.append((False, f"reload failed: {type(exc).__name__}: {exc}"))
        os.write(wake_w, b"\0")

    try:
        metrics = f", metrics on port {pool.metrics_port}" if pool.metrics_port else ""
        view.note(f"pool running, BGPOOL_ADDRESS={pool.address}{metrics}")
        view.started(pool)
        selector.register(watch, selectors.EVENT_READ, ("watch", 0))
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
                        if reloader is not None:
                            view.note("SIGHUP: a reload is running already")
                        else:
                            view.note("SIGHUP: loading the config file again")
                            reloader = threading.Thread(target=reload_in_background)
                            reloader.start()
                    if 0 in received and reloader is not None:
                        reloader.join()
                        reloader = None
                        ok, text = outcome.pop()
                        view.note(text)
                        if not ok:
                            print(f"bgpool: {text}", file=sys.stderr)
                        with contextlib.suppress(BgpoolError):
                            pool._config_reloaded(ok, text)
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
        for thread in (stopper, reloader):
            if thread is not None:
                thread.join()
        selector.unregister(watch)
        selector.unregister(wake_r)
        watch.close()
        signal.set_wakeup_fd(previous)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        os.close(wake_r)
        os.close(wake_w)
