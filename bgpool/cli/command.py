"""COMMAND of `bgpool run CONFIG -- COMMAND [ARG...]`: the application, run
as a child of `bgpool run` once the pool is up (`BGPOOL_ADDRESS` in its
environment), for servers whose master process runs no application code
(uvicorn `--workers`, hypercorn, celery).

`bgpool run` is then a small init, so that it can be a container's PID 1:

- It passes COMMAND every signal of `FORWARDED` it receives. It has a handler
  for each, because PID 1 of a PID namespace is not sent a signal it has no
  handler for (the kernel drops it): without one, `docker kill -s USR1` would
  never reach COMMAND.
- COMMAND runs in its own process group. A terminal's Ctrl-C goes to the
  foreground group; sharing `bgpool run`'s, COMMAND would get SIGINT twice,
  from the terminal and forwarded. In its own group it gets each signal once.
- `bgpool run` is a child subreaper: whatever COMMAND forks and orphans is
  re-parented to it (not to init), and reaped as it exits (`reap()`), so no
  zombie piles up under a PID 1 that never waits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Collection, Mapping, Sequence

from .. import platform

FORWARDED = (
    signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM,
    signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGWINCH,
)  # fmt: skip
"""The signals `bgpool run` passes on to COMMAND: the asynchronous ones meant
for a process. Not SIGCHLD (ours), not the job-control stops, not the signals
of a fault (SIGSEGV and the like are the kernel's reply to our own code)."""

NOT_FOUND = 127
"""Exit status when COMMAND cannot be found (a shell's convention)."""
NOT_EXECUTABLE = 126
"""Exit status when COMMAND was found but cannot be run."""


def exit_code(returncode: int) -> int:
    """A child's return code as a shell gives it: its exit status, or 128+N
    for a death by signal N (SIGKILL: 137)."""
    return 128 - returncode if returncode < 0 else returncode


class Command:
    """COMMAND, started in its own process group, as a child of this process,
    which becomes a child subreaper first. Raises `OSError` if it cannot be
    run (not found, not executable)."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str]) -> None:
        platform.set_child_subreaper()
        self._proc = subprocess.Popen(list(argv), env=dict(env), process_group=0)
        self.name = os.path.basename(argv[0])
        self.returncode: int | None = None
        """Once it exited and was reaped: its exit status, or -N for signal N."""

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def status(self) -> int | None:
        """`bgpool run`'s exit status for it (`exit_code()`), once it exited."""
        return None if self.returncode is None else exit_code(self.returncode)

    def forward(self, sig: int) -> None:
        """Pass `sig` on to COMMAND, while it runs."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    def reap(self, keep: Collection[int]) -> bool:
        """Reap every child that exited but COMMAND and `keep` (orphans
        re-parented to us), then COMMAND if it exited: True the first time it
        is found exited (`returncode` is then set)."""
        for pid in platform.child_pids():
            if pid != self._proc.pid and pid not in keep:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
        if self.returncode is not None:
            return False
        self.returncode = self._proc.poll()
        return self.returncode is not None
