"""Every operating-system-specific call bgpool makes, behind small functions.

Linux first: prctl (parent-death signal, child subreaper), SO_PEERCRED, pidfd,
/dev/shm. Another platform is added here and nowhere else.

psutil is imported by the functions that use it, not at the top: workers and
code generations import this module, and a worker forked from a process that
never loaded psutil is smaller and quicker to fork.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import resource
import signal
import socket
import struct
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

from . import _oscalls, texts

if TYPE_CHECKING:
    import psutil

LINUX = sys.platform.startswith("linux")

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> None:
    if LINUX:
        _oscalls.prctl(option, value)


def set_parent_death_signal(sig: signal.Signals) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies.

    Runs in the worker after fork. The kernel ties it to the thread that forked,
    which in the supervisor is its only thread.
    """
    _prctl(_PR_SET_PDEATHSIG, int(sig))


LEASE_SIGNAL = signal.SIGRTMIN + 6 if LINUX else 0
"""The signal a singleton worker's supervisor queues to move its lease guard's
deadline (`guard_lease`): a real-time one, so each renewal is delivered, in
order, with its value."""


def boottime() -> float:
    """Seconds on CLOCK_BOOTTIME: monotonic, and counting the time a suspended
    machine slept (CLOCK_MONOTONIC does not), as a lease's expiry does."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def guard_lease(deadline: float) -> None:
    """Runs in a singleton worker, before its target: the kernel kills this
    process (SIGKILL) at `deadline` (`boottime()` seconds), a deadline its
    supervisor moves on with `move_lease_guard` (see _oscalls.c)."""
    _oscalls.lease_guard(int(deadline * 1e9), LEASE_SIGNAL)


def move_lease_guard(pid: int, deadline: float) -> None:
    """Move the lease guard of worker `pid` (our child) to `deadline`."""
    with contextlib.suppress(ProcessLookupError):
        _oscalls.sigqueue(pid, LEASE_SIGNAL, int(deadline * 1e9))


def set_child_subreaper() -> None:
    """Make orphaned descendants of this process its children (not init's), so the
    supervisor can reap and kill what a worker left behind."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def set_process_name(name: bytes) -> None:
    """Rename this process's comm, as `ps -o comm` and `top` show it (cut to
    15 bytes by the kernel)."""
    if LINUX:
        _oscalls.set_name(name)


_titled = False  # setproctitle has found this process's command line (forks inherit it)
_set_title: Callable[[str], None] | None = None


def set_process_title(title: str) -> None:
    """Show `title` as this process's command line (/proc/PID/cmdline, what
    `ps` shows), and its first 15 bytes as its comm.

    setproctitle writes the title over the command line in place. Told not to
    use the environment's memory past it (`SPT_NOENV`), it leaves
    /proc/PID/environ intact, where the straggler sweep finds the pool's mark
    (`BGPOOL_POOL`) in every pool process and in what a worker forks; the title
    is then cut to the length of the command line the process was started with.
    setproctitle reads `SPT_NOENV` once, at its first title in a process image:
    it is set for that call only, so workers do not inherit it."""
    global _titled, _set_title
    if _set_title is None:
        _set_title = _setproctitle()
    if _titled:
        _set_title(title)
        return
    before = os.environ.get("SPT_NOENV")
    os.environ["SPT_NOENV"] = "1"
    try:
        _set_title(title)
    finally:
        if before is None:
            del os.environ["SPT_NOENV"]
        else:
            os.environ["SPT_NOENV"] = before
    _titled = True


def _setproctitle() -> Callable[[str], None]:
    """setproctitle's `setproctitle()`, from its C module loaded without the
    package around it when it can be: the package imports `logging`, and with
    it `threading`, whose after-fork hooks every process forked from one that
    imported them runs. The seed, which every worker is forked from, imports
    what workers need and nothing else (`zygote.seed` says what the hooks
    cost)."""
    from importlib.machinery import EXTENSION_SUFFIXES, ExtensionFileLoader, FileFinder, PathFinder
    from importlib.util import module_from_spec

    name = "setproctitle._setproctitle"
    package = None if name in sys.modules else PathFinder.find_spec("setproctitle")
    for directory in (package and package.submodule_search_locations) or []:
        spec = FileFinder(directory, (ExtensionFileLoader, EXTENSION_SUFFIXES)).find_spec(name)
        if spec is not None and spec.loader is not None:
            module = module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules[name] = module  # what a later `import setproctitle` takes
            break
    if name in sys.modules:
        setter: Callable[[str], None] = sys.modules[name].setproctitle
        return setter
    import setproctitle  # a layout we do not know: the package, and its imports

    return setproctitle.setproctitle


def fork_server(
    sock: socket.socket, max_fds: int, spares: int, spare_after: float, max_packet: int
) -> tuple[bytes, list[int]] | int | None:
    """Fork one child per request read on `sock` (a SOCK_SEQPACKET socket; a
    request brings up to `max_fds` descriptors, its packet at most
    `max_packet` bytes), answering each with ``{"t": "spawned", "pid": n}``
    or ``{"t": "failed", "errno": n}``; and while `spare_after` seconds pass
    without a request, fork a spare, up to `spares` on offer, each offered as
    ``{"t": "spare", "pid": n}`` with the other end of its own socket as
    SCM_RIGHTS (which it hangs up once taken). Returns here, once `sock`
    closed, None; in a request's child, the request and its descriptors; in
    a spare, its own socket's descriptor.

    Every child is a child of this process's parent (CLONE_PARENT): a code
    generation forks workers this way, so every worker stays a direct child
    of the supervisor, which alone waits for, signals and reaps them. The
    interpreter's own before- and after-fork steps run around each fork, as
    they do for `os.fork()`. Call it from a single-threaded process only.
    """
    if not LINUX:
        raise OSError(errno.ENOSYS, "forking a sibling process needs Linux")
    after_ms = round(spare_after * 1000)
    return _oscalls.fork_server(sock.fileno(), max_fds, spares, after_ms, max_packet)


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a connected AF_UNIX socket."""
    if LINUX:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return int(struct.unpack("3i", creds)[1])
    raise OSError("peer credentials are not supported on this platform")


def pidfd_open(pid: int) -> int:
    """A file descriptor that becomes readable when process `pid` exits."""
    return os.pidfd_open(pid)


def exit_status(pidfd: int) -> int | None:
    """The exit status of the exited child behind `pidfd` (negative: killed by
    that signal), left for its reaper; None if another reaper took it first
    (an application's own SIGCHLD handler, say)."""
    try:
        result = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:
        return None
    if result is None:
        return None
    return -result.si_status if result.si_code != os.CLD_EXITED else result.si_status


def pidfd_send_signal(pidfd: int, sig: signal.Signals) -> None:
    """Signal the process behind `pidfd` (never one that reused its pid); a
    process that already exited is not an error."""
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, sig)


def map_shm_readonly(name: str) -> mmap.mmap:
    """Map a POSIX shared-memory segment read-only, without registering it with
    multiprocessing's resource tracker (which on Python < 3.13 would unlink it
    when this reader exits: CPython #82300)."""
    fd = os.open(f"/dev/shm/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)


def create_shm(name: str, size: int) -> mmap.mmap:
    """Create POSIX shared-memory segment `name` (0600, `size` zero bytes) and
    map it read-write; `FileExistsError` if the name is taken. Not through
    multiprocessing.shared_memory, whose import (the package, pickle,
    subprocess, its resource tracker) would cost a starting supervisor ~8 ms."""
    fd = os.open(f"/dev/shm/{name}", os.O_RDWR | os.O_CLOEXEC | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    except BaseException:
        unlink_shm(name)
        raise
    finally:
        os.close(fd)


def open_shm(name: str, *, create: bool) -> int:
    """Open a POSIX shared-memory segment read-write (0600, created if asked)."""
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    return os.open(f"/dev/shm/{name}", flags, 0o600)


def unlink_shm(name: str) -> None:
    """Remove a shared-memory segment by name; missing is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"/dev/shm/{name}")


def shm_names(prefix: str) -> list[str]:
    """The shared-memory segments whose names start with `prefix`."""
    try:
        return [name for name in os.listdir("/dev/shm") if name.startswith(prefix)]
    except OSError:
        return []


def fill_closed_stdio() -> None:
    """Open /dev/null on whichever of descriptors 0, 1 and 2 is closed (a
    daemon's, or a service manager's doing), so that no descriptor bgpool
    creates afterwards lands there, where stdio redirection would replace it."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free: `fd` itself
            if null == fd:
                os.set_inheritable(fd, True)
            else:
                os.dup2(null, fd, inheritable=True)
                os.close(null)


def fd_limits() -> tuple[int, int]:
    """RLIMIT_NOFILE as (soft, hard); -1 for unlimited."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    infinity = resource.RLIM_INFINITY
    return (-1 if soft == infinity else soft), (-1 if hard == infinity else hard)


def os_error_words(exc: OSError) -> str:
    """`exc` as words, with the descriptor limit when running out of
    descriptors was the cause (the fix is then to raise it)."""
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return f"{exc} {texts.fd_limits_now(*fd_limits())}"
    return str(exc)


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (each worker costs the
    supervisor a few descriptors) and return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def close_fds_except(keep: set[int]) -> None:
    """Close every descriptor above stdio except `keep` (runs in a fresh child,
    so no sibling's stop pipe survives into it)."""
    low = 3
    for fd in sorted(keep):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def processes_with_env(name: str, value: str) -> list[psutil.Process]:
    """Live processes of ours whose environment (as exec gave it) has
    `name=value`: how a pool finds its processes even once they left the
    process tree (re-parented to init) or started their own session."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(name) == value:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def _children(pid: int) -> list[int] | None:
    """`pid`'s children, from /proc/<pid>/task/*/children (Linux): none if
    `pid` is gone; None if the kernel does not list children (or a task went
    away while they were read: the caller then scans the process table)."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as listing:
                found.extend(int(child) for child in listing.read().split())
    except FileNotFoundError:
        return [] if not os.path.exists(f"/proc/{pid}") else None
    except (OSError, ValueError):
        return None
    return found


def child_pids() -> list[int]:
    """This process's children, those that exited and wait to be reaped
    included: from /proc/self/task/*/children (Linux), else a scan of the
    process table."""
    found = _children(os.getpid())
    if found is not None:
        return found
    import psutil

    with contextlib.suppress(OSError):  # out of descriptors: none found this time
        return [p.pid for p in psutil.process_iter(["ppid"]) if p.info["ppid"] == os.getpid()]
    return []


def descendants(pids: Collection[int]) -> dict[int, list[psutil.Process]]:
    """Each of `pids`' descendants: walked down from each pid when the kernel
    lists children (a few reads per worker, where a scan reads every process
    on the machine), else from one scan of the process table."""
    import psutil

    walked = {pid: _walk(pid) for pid in pids}
    if all(tree is not None for tree in walked.values()):
        return {pid: tree for pid, tree in walked.items() if tree is not None}
    children: dict[int, list[psutil.Process]] = defaultdict(list)
    with contextlib.suppress(OSError):  # out of descriptors: what was read so far
        for proc in psutil.process_iter(["ppid"]):
            children[proc.info["ppid"]].append(proc)
    found: dict[int, list[psutil.Process]] = {}
    for pid in pids:
        tree, stack = [], [pid]
        while stack:
            for child in children.get(stack.pop(), ()):
                tree.append(child)
                stack.append(child.pid)
        found[pid] = tree
    return found


def _walk(pid: int) -> list[psutil.Process] | None:
    """`pid`'s descendants through /proc/<pid>/task/*/children; None if the
    kernel does not list children."""
    import psutil

    tree: list[psutil.Process] = []
    stack = [pid]
    while stack:
        children = _children(stack.pop())
        if children is None:
            return None
        for child in children:
            with contextlib.suppress(psutil.Error):
                tree.append(psutil.Process(child))
                stack.append(child)
    return tree


def tree_rss(pids: Collection[int]) -> dict[int, int]:
    """The resident memory, in bytes, of each of `pids` with its descendants
    (/proc/<pid>/statm, one read per process; the trees found in one pass).
    A pid that is gone is left out."""
    import psutil

    trees = descendants(pids)
    page = os.sysconf("SC_PAGE_SIZE")
    sizes: dict[int, int] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as statm:
                total = int(statm.read().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue
        for proc in trees.get(pid, []):
            with contextlib.suppress(psutil.Error, OSError):
                total += proc.memory_info().rss
        sizes[pid] = total
    return sizes


def process_tree(pid: int) -> list[psutil.Process]:
    """`pid` and all its descendants, parents first; empty if it is gone.
    Reading /proc can fail (out of descriptors): then as much as was found."""
    import psutil

    try:
        root = psutil.Process(pid)
    except (psutil.NoSuchProcess, OSError):
        return []
    walked = _walk(pid)
    if walked is not None:
        return [root, *walked]
    try:
        return [root, *root.children(recursive=True)]
    except (psutil.NoSuchProcess, OSError):
        return [root]


def signal_tree(procs: list[psutil.Process], sig: signal.Signals) -> None:
    """Send `sig` to each process that still exists (the pid is checked against
    its start time by psutil, so a recycled pid is never hit)."""
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.send_signal(sig)


def preload() -> bool:
    """Import psutil, which the process-tree functions here import on first
    use: a process that will need them calls this when it has nothing else to
    do, and its first drain does not wait for the import. False if it could
    not be read now (out of descriptors): the caller may try again later."""
    try:
        import psutil  # noqa: F401
    except OSError:
        return False
    return True


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to `timeout` seconds for `procs` to end (reaping those that are
    our children); those still alive."""
    import psutil

    return psutil.wait_procs(procs, timeout=timeout)[1]


# inotify (Linux): the file watcher's one descriptor (supervisor/watch.py). The
# masks are the kernel's (<sys/inotify.h>); IN_NONBLOCK and IN_CLOEXEC equal
# O_NONBLOCK and O_CLOEXEC on every Linux architecture.

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000

_INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name


def inotify_init() -> int:
    """A new inotify descriptor, non-blocking and close-on-exec (so no worker
    inherits it)."""
    if not LINUX:
        raise OSError(errno.ENOSYS, "watching files needs Linux (inotify)")
    return _oscalls.inotify_init()


def inotify_add_watch(fd: int, path: str | os.PathLike[str], mask: int) -> int:
    """Watch `path` for the events of `mask`; the watch descriptor. Watching
    an inode that is already watched (through another path) returns its wd."""
    return _oscalls.inotify_add_watch(fd, os.fsencode(path), mask)


def inotify_rm_watch(fd: int, wd: int) -> None:
    """Stop watch `wd` (EINVAL if the kernel already dropped it: its inode is gone)."""
    _oscalls.inotify_rm_watch(fd, wd)


def inotify_events(data: bytes) -> list[tuple[int, int, str]]:
    """The events in a buffer read from an inotify descriptor, as (wd, mask,
    name); name is "" for an event on the watched inode itself."""
    events: list[tuple[int, int, str]] = []
    offset = 0
    while offset + _INOTIFY_EVENT.size <= len(data):
        wd, mask, _cookie, length = _INOTIFY_EVENT.unpack_from(data, offset)
        offset += _INOTIFY_EVENT.size
        name = data[offset : offset + length].rstrip(b"\0")
        offset += length
        events.append((wd, mask, os.fsdecode(name)))
    return events


def hide_control_echo(fd: int) -> Callable[[], None]:
    """Make the terminal at `fd` echo a typed control character (Ctrl-C) as
    itself, which moves nothing, rather than as the two characters `^C`
    (ECHOCTL off), which can wrap the last line of a display redrawn in
    place onto a new one. Returns what turns it back as it was (a no-op if
    `fd` is not a terminal)."""
    import termios

    try:
        saved = termios.tcgetattr(fd)
    except termios.error:
        return lambda: None
    quiet = list(saved)
    quiet[3] &= ~termios.ECHOCTL
    termios.tcsetattr(fd, termios.TCSANOW, quiet)

    def restore() -> None:
        with contextlib.suppress(termios.error):
            termios.tcsetattr(fd, termios.TCSANOW, saved)

    return restore
