"""File watch (`WorkerSpec.watch`): a change to a matching file restarts that
worker on a new code generation, as `restart_workers([name])` would.

The watcher is one inotify descriptor in the loop's selector (no thread, no
polling). Changes are debounced: the restart happens `DEBOUNCE` seconds after
the first change, for every declaration whose files changed meanwhile, so an
editor's several writes (or a checkout touching many files) make one restart.
"""

from __future__ import annotations

import logging
import selectors
from collections.abc import Hashable
from pathlib import Path
from typing import Any

from .control import Control
from .core import Settings
from .generations import Generation
from .listener import Connection
from .registry import Registry
from .timers import Timer
from .watch import FileWatch

log = logging.getLogger("bgpool")

DEBOUNCE = 0.2
"""Seconds from a watched file's first change to the restart it causes."""

Key = tuple[int, str | None]  # a declaration: its scope and name (None: the catch-all)


class Watches(Control):
    """Watching the declared files, and restarting what they belong to."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.file_watch: FileWatch | None = None
        self.changed_decls: set[Hashable] = set()  # keys (Key) whose files changed
        self.debounce: Timer | None = None
        self.watched: set[Key] = set()
        self._watch_files()

    def _watch_files(self) -> None:
        """Watch what the current declarations ask for (nothing asked: no watcher)."""
        wanted = {(d.scope_id, d.name): d.watch for d in self.registry.decls if d.watch}
        if self.file_watch is None:
            if not wanted:
                return
            self.file_watch = FileWatch()
            self.selector.register(self.file_watch, selectors.EVENT_READ, self._on_file_change)
        root = Path(self.settings.root)
        for key, patterns in wanted.items():
            self.file_watch.set(key, root, patterns)
        for key in self.watched - wanted.keys():
            self.file_watch.discard(key)
        self.watched = set(wanted)
        self._log_watch_errors()

    def _log_watch_errors(self) -> None:
        assert self.file_watch is not None
        for problem in self.file_watch.errors:
            log.warning("file watch: %s", problem)
        self.file_watch.errors.clear()

    def _on_file_change(self, _fd: object) -> None:
        assert self.file_watch is not None
        self.changed_decls |= self.file_watch.changed()
        self._log_watch_errors()
        if self.changed_decls and self.debounce is None:
            self.debounce = self.timers.call_later(DEBOUNCE, self._restart_changed)

    def _restart_changed(self) -> None:
        """Restart every worker of the declarations whose files changed (a
        new generation even if none runs: later starts get the new code)."""
        self.debounce = None
        keys, self.changed_decls = self.changed_decls, set()
        workers = [w for w in self.workers.values() if (w.decl.scope_id, w.decl.name) in keys]
        labels = sorted(w.label for w in workers) or ["nothing running"]
        log.info("watched files changed: restarting %s on new code", ", ".join(labels))
        self._roll(workers, self._answer_conn(None))

    def _apply(
        self, conn: Connection, registry: Registry, settings: Settings, gen: Generation
    ) -> None:
        super()._apply(conn, registry, settings, gen)
        self._watch_files()

    def close_file_watch(self) -> None:
        """Stop watching (at teardown)."""
        if self.file_watch is not None:
            self.file_watch.close()
