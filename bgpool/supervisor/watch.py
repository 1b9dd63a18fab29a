"""Which declarations' watched files changed (`WorkerSpec.watch`), from one
inotify descriptor the supervisor's selector waits on: no thread (the
supervisor forks, and must stay single-threaded), no polling.

inotify watches directories, not patterns, and never recursively, so this
module keeps the map between the two: each pattern is split into its literal
base directory and the glob tail below it; the base is watched, and so is
every directory below it the tail can reach (`src/*.py`: only `src`;
`src/**/*.py`: the whole tree). A base that does not exist yet is waited for
from its nearest existing ancestor. Directories appearing or going away
inside a watched tree add or drop watches as their events are read. One
watch serves every key that wants its directory.

Runs in the supervisor only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections import defaultdict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from .. import platform

_DIR_EVENTS = (
    platform.IN_CREATE
    | platform.IN_DELETE
    | platform.IN_MODIFY
    | platform.IN_CLOSE_WRITE
    | platform.IN_MOVED_FROM
    | platform.IN_MOVED_TO
    | platform.IN_DELETE_SELF
    | platform.IN_MOVE_SELF
)
# IN_EXCL_UNLINK: no events from files already unlinked (a deleted temp file
# still being written); IN_ONLYDIR: a path that became a file is refused.
_MASK = _DIR_EVENTS | platform.IN_EXCL_UNLINK | platform.IN_ONLYDIR
_GONE = platform.IN_IGNORED | platform.IN_DELETE_SELF | platform.IN_MOVE_SELF
_APPEARED = platform.IN_CREATE | platform.IN_MOVED_TO

_MAGIC = re.compile(r"[*?[]")
_PYCACHE = "__pycache__"
_READ_SIZE = 65536  # far above one event (16 bytes + NAME_MAX + 1)

# set[...] spelled outside FileWatch, whose method `set` hides the builtin in
# the class's own annotations
_Keys = set[Hashable]
_Dirs = set[Path]


def _match(pattern: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    """Whether path components `parts` match glob components `pattern`.

    Each component is an fnmatch pattern of one path component (so `*`, `?`
    and `[..]` never cross `/`); `**` matches any number of components, none
    included.
    """
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_match(rest, parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], head) and _match(rest, parts[1:])


def _may_hold(pattern: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    """Whether a path below directory `parts` (one component or more further
    down) could match `pattern`: whether that directory needs a watch."""
    if not parts:
        return bool(pattern)
    if not pattern:
        return False
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return True  # `**` can take in all of `parts`, the rest what lies below
    return fnmatchcase(parts[0], head) and _may_hold(rest, parts[1:])


@dataclass(frozen=True)
class _Pattern:
    """One watch pattern, absolute: its literal directory and the glob below it."""

    base: Path
    """The deepest directory named literally (`/root/src` for `src/**/*.py`)."""
    tail: tuple[str, ...]
    """The components from there (`("**", "*.py")`); at least one."""

    @classmethod
    def parse(cls, root: Path, text: str) -> _Pattern:
        """`text` resolved against `root` (an absolute `text` stands alone)."""
        parts = Path(os.path.abspath(os.path.join(root, text))).parts
        first = next((i for i, part in enumerate(parts) if _MAGIC.search(part)), len(parts) - 1)
        first = max(first, 1)  # parts[0] is "/"
        return cls(Path(*parts[:first]), parts[first:])

    def _below_base(self, path: Path) -> tuple[str, ...] | None:
        """`path`'s components under the base; None if it is not under it."""
        base = self.base.parts
        parts = path.parts
        return parts[len(base) :] if parts[: len(base)] == base else None

    def matches(self, path: Path) -> bool:
        """Whether a change to file `path` counts."""
        rest = self._below_base(path)
        return rest is not None and _match(self.tail, rest)

    def leads_to_base(self, directory: Path) -> bool:
        """Whether `directory` is the base or one of its ancestors."""
        parts = directory.parts
        return self.base.parts[: len(parts)] == parts

    def wants(self, directory: Path) -> bool:
        """Whether `directory` needs a watch: a file below it could match, or
        it is on the way to a base that does not exist yet. Never one in
        `__pycache__`: unwatched, nothing there ever counts."""
        if _PYCACHE in directory.parts:
            return False
        rest = self._below_base(directory)
        if rest is None:
            return self.leads_to_base(directory)
        return _may_hold(self.tail, rest)


@dataclass
class _Watch:
    """An inotify watch on one directory, and the keys that want it."""

    wd: int
    keys: set[Hashable] = field(default_factory=set)


class FileWatch:
    """Glob patterns per key, over one non-blocking inotify descriptor.

    Register it (it has `fileno()`) in a selector; when it is readable,
    `changed()` says which keys had a matching file created, written, moved
    in or out, or deleted. Problems that do not stop the rest (a directory
    that cannot be watched) collect in `errors` for the caller to log.
    """

    def __init__(self) -> None:
        self._fd = platform.inotify_init()
        self._patterns: dict[Hashable, list[_Pattern]] = {}
        self._dirs: dict[Path, _Watch] = {}
        # wd -> the watched paths it stands for: several when one directory is
        # reached by two paths (a symlink), as the kernel gives both one wd
        self._paths: dict[int, set[Path]] = defaultdict(set)
        self._errors: list[str] = []
        self._limit_reported = False

    def fileno(self) -> int:
        """The inotify descriptor (-1 once closed)."""
        return self._fd

    @property
    def errors(self) -> list[str]:
        """Problems met so far, as sentences; the caller clears the list once
        it has logged them."""
        return self._errors

    def set(self, key: Hashable, root: Path, patterns: list[str]) -> None:
        """Make `key` watch `patterns` (relative ones resolved against `root`),
        instead of whatever it watched before; no patterns: `discard(key)`."""
        if not patterns:
            self.discard(key)
            return
        self._patterns[key] = [_Pattern.parse(root, text) for text in patterns]
        self._apply(key)

    def discard(self, key: Hashable) -> None:
        """Stop watching anything for `key` (an unknown key is fine)."""
        self._patterns.pop(key, None)
        self._apply(key)

    def changed(self) -> _Keys:
        """Read every pending event (without blocking) and return the keys
        with a pattern matching a file that changed. Keeps the watches in step
        with directories created, moved or removed meanwhile."""
        changed: set[Hashable] = set()
        for wd, mask, name in platform.inotify_events(self._read()):
            if mask & platform.IN_Q_OVERFLOW:
                changed |= self._overflowed()
                continue
            for directory in list(self._paths.get(wd, ())):
                changed |= self._event(directory, mask, name)
        return changed

    def close(self) -> None:
        """Close the descriptor (its watches go with it); twice is fine."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._dirs.clear()
        self._paths.clear()

    # Reading events

    def _read(self) -> bytes:
        """All the bytes the descriptor has now."""
        chunks: list[bytes] = []
        while self._fd >= 0:
            try:
                chunk = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def _event(self, directory: Path, mask: int, name: str) -> _Keys:
        """The keys one event on watched `directory` (about its entry `name`,
        or about itself when `name` is "") makes changed."""
        if not name:
            if mask & _GONE:  # its path no longer leads to it: the watch is useless
                return self._dir_gone(directory, moved=bool(mask & platform.IN_MOVE_SELF))
            return set()
        path = directory / name
        if mask & platform.IN_ISDIR:
            if mask & _APPEARED:
                return self._dir_appeared(path)
            if mask & (platform.IN_DELETE | platform.IN_MOVED_FROM):
                return self._dir_gone(path, moved=bool(mask & platform.IN_MOVED_FROM))
            return set()
        return {key for key, patterns in self._patterns.items() if _any_match(patterns, [path])}

    def _dir_appeared(self, path: Path) -> _Keys:
        """A directory was created or moved in: watch it (and what below it the
        patterns reach) for each key that wants it, and return the keys with a
        matching file already there (written before its watch existed, or
        moved in with it)."""
        if path in self._dirs:
            # a directory renamed over an empty one: the watch there is the
            # replaced directory's (or one a scan just made: made again)
            self._dir_gone(path, moved=True)
        changed: set[Hashable] = set()
        for key, patterns in list(self._patterns.items()):
            wanting = [p for p in patterns if p.wants(path)]
            if not wanting:
                continue
            if any(p.leads_to_base(path) for p in wanting):
                # a missing base, or a directory on the way to it: move the
                # watch down from the ancestor that waited for it
                files = [f for f in self._apply(key) if path in f.parents]
            else:
                _, files = self._watch_tree(key, wanting, path)
            if _any_match(wanting, files):
                changed.add(key)
        return changed

    def _dir_gone(self, path: Path, *, moved: bool) -> _Keys:
        """A directory was deleted or moved away: drop the watches at and below
        it, and let keys whose base was there wait for it again from an
        ancestor. Moved away, its files left without events of their own: the
        keys watching there count as changed. (Deleted, it was empty, and each
        file's deletion had its own event.)"""
        if moved:
            inside = f"{path}/"
            gone = [d for d in self._dirs if d == path or str(d).startswith(inside)]
        else:
            gone = [path] if path in self._dirs else []
        users: set[Hashable] = set()
        for directory in gone:
            users |= self._dirs[directory].keys
            self._forget(directory)
        for key, patterns in list(self._patterns.items()):
            if any(p.leads_to_base(path) for p in patterns):
                self._apply(key)
        return users if moved else set()

    def _overflowed(self) -> _Keys:
        """The kernel's queue overflowed, so events were lost: directories may
        have appeared unseen (rescan every key) and any file may have changed."""
        self._errors.append(
            "the inotify event queue overflowed (events were lost): every watched file "
            "counts as changed"
        )
        for key in list(self._patterns):
            self._apply(key)
        return set(self._patterns)

    # Keeping the watches in step with the patterns

    def _apply(self, key: Hashable) -> list[Path]:
        """Watch what `key`'s patterns need and drop the watches it no longer
        needs; the files seen in the directories it watches."""
        needed: set[Path] = set()
        files: list[Path] = []
        for pattern in self._patterns.get(key, []):
            dirs, seen = self._watch_pattern(key, pattern)
            needed |= dirs
            files += seen
        for directory in [d for d, w in self._dirs.items() if key in w.keys and d not in needed]:
            self._unuse(key, directory)
        return files

    def _watch_pattern(self, key: Hashable, pattern: _Pattern) -> tuple[_Dirs, list[Path]]:
        """Watch `pattern`'s base and what it reaches below, or, while the base
        does not exist, its nearest existing ancestor; the directories watched
        and the files seen."""
        if _PYCACHE in pattern.base.parts:
            return set(), []  # nothing there ever counts
        top = pattern.base
        while True:
            try:
                if not self._use(key, top):
                    return set(), []
            except (FileNotFoundError, NotADirectoryError):
                if top == top.parent:
                    return set(), []
                top = top.parent
                continue
            if top == pattern.base:
                return self._watch_tree(key, [pattern], top)
            below = top / pattern.base.parts[len(top.parts)]
            if not below.is_dir():
                return {top}, []
            top = below  # created since it was found missing: no event will say so

    def _watch_tree(
        self, key: Hashable, patterns: list[_Pattern], top: Path
    ) -> tuple[_Dirs, list[Path]]:
        """Watch `top` and the directories below it that `patterns` reach, each
        before listing it (so nothing created in between goes unseen); the
        directories watched and the files found in them."""
        dirs: set[Path] = set()
        files: list[Path] = []
        stack = [top]
        while stack:
            directory = stack.pop()
            try:
                if not self._use(key, directory):
                    continue
                dirs.add(directory)
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed meanwhile: an event says so
            except OSError as exc:
                self._errors.append(f"cannot list {directory}: {exc}")
                continue
            for entry in entries:
                path = directory / entry.name
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if not is_dir:
                    files.append(path)
                elif any(p.wants(path) for p in patterns):
                    stack.append(path)
        return dirs, files

    def _use(self, key: Hashable, directory: Path) -> bool:
        """Watch `directory` for `key` (sharing an existing watch); False when
        it cannot be (said in `errors`). A missing directory raises
        FileNotFoundError or NotADirectoryError."""
        watch = self._dirs.get(directory)
        if watch is None:
            try:
                wd = platform.inotify_add_watch(self._fd, directory, _MASK)
            except (FileNotFoundError, NotADirectoryError):
                raise  # not an error: the caller looks elsewhere
            except OSError as exc:
                self._cannot_watch(directory, exc)
                return False
            watch = self._dirs[directory] = _Watch(wd)
            self._paths[wd].add(directory)
        watch.keys.add(key)
        return True

    def _unuse(self, key: Hashable, directory: Path) -> None:
        """`key` no longer needs `directory`'s watch; the last key's leaving ends it."""
        watch = self._dirs[directory]
        watch.keys.discard(key)
        if not watch.keys:
            self._forget(directory)

    def _forget(self, directory: Path) -> None:
        """End the watch on `directory`, whoever used it."""
        watch = self._dirs.pop(directory)
        paths = self._paths[watch.wd]
        paths.discard(directory)
        if not paths:
            del self._paths[watch.wd]
            # EINVAL: the kernel ended it already (the directory is gone)
            with contextlib.suppress(OSError):
                platform.inotify_rm_watch(self._fd, watch.wd)
            self._limit_reported = False  # a watch is free: the next refusal is news

    def _cannot_watch(self, directory: Path, exc: OSError) -> None:
        """Say why `directory` cannot be watched. Running out of watches is
        said once, not once per directory of a large tree, until one is freed."""
        if exc.errno != errno.ENOSPC:
            self._errors.append(f"cannot watch {directory}: {exc}")
        elif not self._limit_reported:
            self._limit_reported = True
            self._errors.append(
                f"cannot watch {directory}: {exc} (the limit of inotify watches is reached: "
                "raise it with sysctl fs.inotify.max_user_watches)"
            )


def _any_match(patterns: Iterable[_Pattern], files: Iterable[Path]) -> bool:
    """Whether any of `files` matches any of `patterns`."""
    patterns = list(patterns)
    return any(p.matches(f) for f in files for p in patterns)
