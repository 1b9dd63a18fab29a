"""Where named pools live, and how one name is held by one pool at a time.

A named pool (`PoolConfig.name`) has its control socket at a fixed place, so
that `bgpool status --pool NAME` and `connect(pool=NAME)` find it without an
address, and plain `bgpool status` finds the only one running:

    $XDG_RUNTIME_DIR/bgpool/NAME/control.sock  when XDG_RUNTIME_DIR is a directory of this user's
    <temp dir>/bgpool-UID/NAME/control.sock    otherwise (`tempfile.gettempdir()`: $TMPDIR, /tmp)
                          NAME/pid             the name's lock, and who holds it

Each directory is made 0700; one that is already there must be a directory (not
a symlink) of this user's that nobody else may write to, or it is refused:
whoever can write there could put a socket of their own in the pool's place.

One pool per name: `Pool.start()` takes an exclusive `flock` on NAME/pid (and is
refused, with the holder's pids, while a running pool holds it), then hands the
descriptor to its supervisor, which keeps it for its whole life and removes the
socket and the pid file before it lets go. A pool that died without doing so
(SIGKILL) released the lock with its last process: its socket and pid file are
stale, and the next pool of that name takes them over. The NAME directory stays.

Runs in the application (the owner, clients, the CLI) and in the supervisor.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import stat

from . import texts
from .errors import BgpoolError
from .names import pool_name_problem

SOCKET = "control.sock"
PID_FILE = "pid"

MAX_SOCKET_PATH = 107
"""The longest AF_UNIX socket path, in bytes (`sun_path` holds 108 with the NUL)."""

LOCK_ATTEMPTS = 10
"""Times `_lock()` opens the pid file again when its last holder removed it
between the open and the lock (a lock on a removed file would hold nothing)."""

PROBE_TIMEOUT = 1.0
"""Seconds `running()` waits for one pool's socket to accept a connection."""


def check_name(name: object) -> str:
    """`name` if a pool may have it, else `TypeError` / `ValueError` saying why."""
    if not isinstance(name, str):
        raise TypeError(f"pool name must be a str, not {type(name).__name__}")
    if (problem := pool_name_problem(name)) is not None:
        raise ValueError(f"pool name {name!r} {problem}")
    return name


def _base() -> str:
    """This user's directory of named pools (not made, not checked)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime):
        with contextlib.suppress(OSError):
            info = os.stat(runtime)
            if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
                return os.path.join(runtime, "bgpool")
    # Imported here: the supervisor imports this module, and what it imports
    # before it forks its seed every worker carries.
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"bgpool-{os.getuid()}")


def _checked(path: str, *, create: bool) -> bool:
    """Whether directory `path` exists (made 0700 first if `create`);
    `BgpoolError` if it is not a directory of this user's that only this user
    may write to."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(info.st_mode):
        raise BgpoolError(texts.unsafe_directory(path, "it is not a directory"))
    if info.st_uid != os.getuid():
        problem = f"it is owned by uid {info.st_uid}, not by this user (uid {os.getuid()})"
        raise BgpoolError(texts.unsafe_directory(path, problem))
    if info.st_mode & 0o022:
        problem = (
            f"group or others may write to it (mode {stat.S_IMODE(info.st_mode):o}); "
            f"make it private: chmod 700 {path}"
        )
        raise BgpoolError(texts.unsafe_directory(path, problem))
    return True


def directory(name: str, *, create: bool = False) -> str:
    """The directory of pool `name`'s socket and pid file, made (with its
    parent, both 0700) if `create`; `BgpoolError` if either is unsafe."""
    base = _base()
    path = os.path.join(base, check_name(name))
    if _checked(base, create=create):
        _checked(path, create=create)
    return path


def address(name: str) -> str:
    """Where the control socket of the pool named `name` is (whether or not
    one runs); `ValueError` for a name no pool can have."""
    return os.path.join(directory(name), SOCKET)


def running() -> list[str]:
    """The names of this user's pools that are running (whose socket accepts a
    connection), sorted."""
    base = _base()
    if not _checked(base, create=False):
        return []
    return sorted(
        name
        for name in os.listdir(base)
        if pool_name_problem(name) is None and _listening(os.path.join(base, name, SOCKET))
    )


def _listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(PROBE_TIMEOUT)
        try:
            sock.connect(path)
        except OSError:  # no socket, or nobody listens on it: a stopped pool
            return False
    return True


def _lock(path: str, *, create: bool) -> int | None:
    """A descriptor holding an exclusive flock on pid file `path` (made if
    `create`); None while another process holds it, or if it is not there."""
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
    for _ in range(LOCK_ATTEMPTS):
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held by a running pool
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if _is_file(fd, path):
            return fd
        os.close(fd)  # its last holder removed it between our open and our lock
        if not create:
            return None
    raise BgpoolError(f"could not lock {path}: it was replaced {LOCK_ATTEMPTS} times in a row")


def _is_file(fd: int, path: str) -> bool:
    """Whether descriptor `fd` is open on the file at `path` now."""
    try:
        on_disk = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def _holders(path: str) -> list[int]:
    """The pids a pid file names (the owner's, then the supervisor's); [] if
    it cannot be read (its pool is still writing it)."""
    try:
        with open(path, encoding="ascii") as file:
            return [int(word) for word in file.read().split()]
    except (OSError, ValueError):
        return []


class NameLock:
    """The hold of one pool name: a descriptor with an exclusive flock on the
    name's pid file. `take()` makes one in the owner; the supervisor rebuilds
    it from the descriptor it inherits (`NameLock(directory, fd)`)."""

    def __init__(self, directory: str, fd: int) -> None:
        self.directory = directory
        self.fd = fd
        os.set_inheritable(fd, False)  # the supervisor's children must not hold the name

    @property
    def address(self) -> str:
        """The control socket's path, in the name's directory."""
        return os.path.join(self.directory, SOCKET)

    @classmethod
    def take(cls, name: str) -> NameLock:
        """Hold `name` for a pool that starts now, taking over what a dead pool
        of that name left; `BgpoolError` naming the pids of the running pool
        that holds it, or if its socket path would be too long for AF_UNIX."""
        socket_path = os.path.join(_base(), check_name(name), SOCKET)
        if (length := len(os.fsencode(socket_path))) > MAX_SOCKET_PATH:
            raise BgpoolError(
                f"the socket path of pool {name!r}, {socket_path}, is {length} bytes, more "
                f"than AF_UNIX allows ({MAX_SOCKET_PATH}): choose a shorter name, or set "
                "XDG_RUNTIME_DIR to a shorter directory"
            )
        path = directory(name, create=True)
        pid_file = os.path.join(path, PID_FILE)
        fd = _lock(pid_file, create=True)
        if fd is None:
            raise BgpoolError(texts.name_taken(name, _holders(pid_file)))
        lock = cls(path, fd)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock.address)  # a dead pool's socket
            lock.record(os.getpid())
        except BaseException:
            lock.release()
            raise
        return lock

    def record(self, *pids: int) -> None:
        """Say in the pid file who holds the name: the owner's pid, then the
        supervisor's."""
        data = " ".join(str(pid) for pid in pids).encode() + b"\n"
        os.pwrite(self.fd, data, 0)
        os.ftruncate(self.fd, len(data))

    def close(self) -> None:
        """Close this process's descriptor; the name stays held by any other
        process that has one (the owner hands it to its supervisor so). Idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def release(self) -> None:
        """Remove the socket and the pid file, then let go of the name: the
        last holder's job, done while it still holds the name, so it never
        removes the files of a pool that took the name over."""
        for leftover in (self.address, os.path.join(self.directory, PID_FILE)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        self.close()


def clear_stale(directory: str) -> None:
    """Remove what a dead pool left in its name's `directory` (its socket and
    pid file), unless a running pool holds the name: what the owner does once
    its supervisor is gone, in case it died without doing it."""
    fd = _lock(os.path.join(directory, PID_FILE), create=False)
    if fd is not None:
        NameLock(directory, fd).release()
