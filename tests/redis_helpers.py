"""A private redis-server for the singleton tests: each test starts its own on a
unix socket in a fresh short directory (so runs beside each other never share
one), and can stop, pause, resume and restart it; the `redis_server` fixture
(conftest.py) stops it afterwards, even when the test failed.

Also what the tests watch the singletons with: the holder records that
``fixtures/singleton_workers.py`` writes, and a sampler that checks every few
milliseconds that no two recorded holders are alive at once.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import redis
from helpers import gone, wait_for

REDIS_SERVER = shutil.which("redis-server")


class RedisServer:
    """One redis-server process, on `socket` in its own directory."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="bgr-"))
        self.socket = self.directory / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, *, persist: bool = False, bind: tuple[str, ...] = (), port: int = 0) -> None:
        """Start it (again), answering PING before this returns; with `persist`
        it saves its data at shutdown and loads it at start (an RDB file); with
        `bind` it also listens on TCP `port` at those addresses."""
        assert REDIS_SERVER is not None
        save = ["--save", "3600 1"] if persist else ["--save", ""]
        tcp = ["--bind", *bind, "--protected-mode", "no"] if bind else []
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(port), *tcp, "--unixsocket", str(self.socket),
             "--unixsocketperm", "700", "--appendonly", "no", *save,
             "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(self._answers, timeout=10, what="redis-server to answer")

    def _answers(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, "redis-server exited"
        try:
            with self.client() as client:
                return bool(client.ping())
        except (redis.RedisError, OSError):
            return False

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=5)

    def stop(self) -> None:
        """SIGTERM (it saves its data first if it persists), and wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: whatever it held is lost."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.paused and self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def holders(directory: Path) -> list[dict[str, Any]]:
    """Every run of a singleton recorded in `directory`, in the order they started."""
    found = []
    for path in directory.glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            found.append(json.loads(path.read_text()))
    return sorted(found, key=lambda r: r["at"])


def live_holders(directory: Path) -> list[dict[str, Any]]:
    return [r for r in holders(directory) if not gone(r["pid"])]


class Sampler:
    """A thread that reads the holder records every `period` seconds and keeps
    every moment when more than one recorded holder was alive."""

    def __init__(self, directory: Path, period: float = 0.003) -> None:
        self.directory = directory
        self.period = period
        self.overlaps: list[list[dict[str, Any]]] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="holder-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            alive = live_holders(self.directory)
            self.samples += 1
            if len(alive) > 1:
                self.overlaps.append(alive)

    def check(self) -> None:
        """Fail if two holders were ever alive at once (or nothing was sampled)."""
        assert self.samples > 10, f"only {self.samples} samples"
        assert not self.overlaps, f"two singletons alive at once: {self.overlaps[:3]}"


def short_dir(prefix: str) -> Path:
    """A fresh private directory with a short path (a unix socket's path is at
    most 107 bytes): an owner's XDG_RUNTIME_DIR, so pools of one name can run
    side by side on this machine as if on several hosts."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def wait_single_holder(
    directory: Path, timeout: float, exclude: frozenset[int] = frozenset()
) -> Any:
    """The one live holder not in `exclude`, once there is one."""

    def one() -> Any:
        alive = [r for r in live_holders(directory) if r["pid"] not in exclude]
        return alive[0] if len(alive) == 1 else None

    return wait_for(one, timeout=timeout, what="one singleton holder")
