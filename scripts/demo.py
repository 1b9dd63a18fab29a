"""The bgpool demo: one pool from fixtures/demo/config.py, start to clean shutdown,
then a gunicorn application whose workers read vars a bgpool worker publishes, and
an ASGI application (Starlette under uvicorn) that awaits its workers with aensure().

Run it with ./scripts/demo (which sets up .venv first).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import timeit
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

import bgpool  # noqa: E402
from fixtures.demo.config import config  # noqa: E402

CLIENT = """
import bgpool
client = bgpool.connect()  # finds the pool through BGPOOL_ADDRESS
client.ensure("clock")
for s in client.status():
    print(f"   seen from pid {__import__('os').getpid()}: {s.name}.{s.instance} {s.state} pid={s.pid}")
client.close()
"""


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def expect(what: str) -> None:
    """Say that the traceback about to appear is the demo's own doing."""
    print(f"   [expected] {what}; what follows is deliberate", flush=True)


def show(pool: bgpool.Pool) -> None:
    print(f"   {'worker':<12} {'state':<9} {'pid':>7} {'attempts':>8} {'last exit':>9}")
    for s in pool.status():
        last = "" if s.last_exit_status is None else s.last_exit_status
        print(f"   {s.name:<12} {s.state:<9} {s.pid or '':>7} {s.attempts:>8} {last:>9}")


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the demo waited too long")
        time.sleep(0.01)


def main() -> int:
    begin = time.monotonic()

    step("1. start(): the supervisor comes up, the eager worker 'clock' becomes ready")
    pool = bgpool.Pool(config)
    t = time.perf_counter()
    pool.start()
    print(f"   start() returned in {(time.perf_counter() - t) * 1000:.0f} ms; "
          f"BGPOOL_ADDRESS={pool.address}")
    show(pool)

    try:
        step("2. ensure('mailer'): a lazy worker, started on demand; ensure() returns once it is ready")
        t = time.perf_counter()
        pool.ensure("mailer")
        print(f"   cold ensure: {(time.perf_counter() - t) * 1000:.1f} ms "
              "(fork + 50 ms warm-up + handle taken)")
        timeit.timeit(lambda: pool.ensure("mailer"), number=20000)  # warm-up, untimed
        best = min(timeit.repeat(lambda: pool.ensure("mailer"), number=20000, repeat=5))
        print(f"   hot ensure: {best / 20000 * 1e6:.2f} µs per call, best of 5 x 20000 "
              "(a shared-memory read, no round trip)")

        step("3. 'flaky' crashes after it was ready: restarted at once, readiness stays")
        expect("'flaky' raises ConnectionError once it is ready")
        pool.ensure("flaky")
        first_pid = next(s.pid for s in pool.status() if s.name == "flaky")
        wait_for(lambda: any(s.name == "flaky" and s.state == "ready" and s.pid != first_pid
                             for s in pool.status()))
        d = pool.diagnostics("flaky")
        assert d.last_error is not None
        print(f"   pid {first_pid} crashed ({d.last_error.type}: {d.last_error.message}); "
              f"now pid {d.instances[0].pid}, state {d.state}, attempts {d.attempts}")
        pool.ensure("flaky")  # still ready: sticky readiness
        print("   ensure('flaky') returns at once: a dependency that was ready stays ready")

        step("4. 'importer' cannot boot: ensure(fail_fast=True) says why at the first failure")
        expect("'importer' fails to boot (its settings file does not exist)")
        try:
            pool.ensure("importer", fail_fast=True)
        except bgpool.WorkerBootFailed as exc:
            print(f"   {type(exc).__name__}: {exc}")
        print("   ...and a tolerant ensure() waits through the retries until the supervisor gives up:")
        expect("'importer' fails to boot twice more, then the supervisor gives up")
        try:
            pool.ensure("importer", timeout=5)
        except bgpool.WorkerAborted as exc:
            print(f"   {type(exc).__name__}: {exc}")
            error = exc.diagnostics.last_error
            print(f"   diagnostics: state={exc.diagnostics.state} attempts={exc.diagnostics.attempts} "
                  f"last_exit_status={exc.diagnostics.last_exit_status}")
            print(f"   last_error: {error.type} at {error.filename}:{error.lineno}")
            print("   traceback tail:\n      " + "\n      ".join(error.traceback.splitlines()[-3:]))
        show(pool)

        step("5. another process of the application reaches the pool through BGPOOL_ADDRESS")
        subprocess.run([sys.executable, "-c", CLIENT], check=True, cwd=ROOT)
    finally:
        step("6. shutdown(): every worker drained (EOF on its handle), nothing left behind")
        table = f"/dev/shm/{pool._table_name}"
        t = time.perf_counter()
        pool.shutdown()
        print(f"   shutdown() took {(time.perf_counter() - t) * 1000:.0f} ms")
    leftovers = psutil.Process().children(recursive=True)
    print(f"   child processes left: {len(leftovers)}; table {table} exists: "
          f"{os.path.exists(table)}; socket exists: {os.path.exists(pool.address)}")
    typo_demo()
    web_ok = web_demo() and asgi_demo()
    print(f"\ndemo finished in {time.monotonic() - begin:.1f} s")
    return 1 if leftovers or os.path.exists(table) or not web_ok else 0


def typo_demo() -> None:
    step("7. a typo in a target's function name: start() refuses at once, no worker is started")
    typo = bgpool.PoolConfig(workers=[
        bgpool.WorkerSpec(name="clock", target="fixtures.demo.workers:clokc", num=1),
    ])  # fmt: skip
    try:
        bgpool.Pool(typo).start()
    except bgpool.StartupError as exc:
        print(f"   {type(exc).__name__}: {exc}")
        print(f"   boot attempts: {exc.diagnostics[0].attempts}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def web_demo() -> bool:
    step("8. a web application: gunicorn's master owns a pool, its 3 workers read a bgpool "
         "worker's vars")
    print("   (fixtures/webapp: the 'flags' worker publishes a snapshot every 0.1 s with "
          "set_vars();\n    each request calls ensure('flags') and get_vars('flags'))")
    port = free_port()
    env = {**os.environ, "WEBAPP_BIND": f"127.0.0.1:{port}", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "gunicorn", "-c", "fixtures/webapp/gunicorn_conf.py",
               "--log-level", "warning", "fixtures.webapp.app:application"]
    # on_exit drains the pool
    return serve_and_get(command, env, port, "gunicorn", lambda f: f"dark_mode={f['dark_mode']} ")


def asgi_demo() -> bool:
    step("9. an ASGI application: uvicorn --workers 2 under `bgpool run`; each server process "
         "awaits aensure()")
    print("   (fixtures/asgiapp: the lifespan awaits aensure(['flags'], fail_fast=True), each "
          "request\n    awaits aensure('flags') and reads get_vars('flags'); 'flags' is an async "
          "worker)")
    port = free_port()
    # this environment's `bgpool` and `uvicorn` scripts first on PATH
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": path}
    command = ["bgpool", "run", "fixtures/asgiapp/config.py", "--",
               "uvicorn", "fixtures.asgiapp.app:app", "--workers", "2",
               "--port", str(port), "--log-level", "warning", "--no-access-log"]
    print(f"   $ {' '.join(command)}")
    if not serve_and_get(command, env, port, "uvicorn", lambda f: ""):
        return False
    print("   with a dependency that cannot boot (ASGIAPP_REQUIRES=flags,importer), the "
          "server does not start:")
    failed = subprocess.run(
        command, cwd=ROOT, env={**env, "ASGIAPP_REQUIRES": "flags,importer"},
        capture_output=True, text=True, timeout=60,
    )
    said = next((line for line in failed.stderr.splitlines()
                 if line.startswith("bgpool.errors.WorkerBootFailed")), None)
    print(f"   {said or 'no WorkerBootFailed in its output'}")
    answered = True
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()
    except OSError:
        answered = False
    print(f"   the server stopped by itself, the pool with it; it answered no request: "
          f"{not answered}\n   (bgpool run exited {failed.returncode}, uvicorn's status: its "
          "master exits 0 when a server process fails to start)")
    return said is not None and not answered


def serve_and_get(
    command: list[str], env: dict[str, str], port: int, what: str, shown: Any
) -> bool:
    """Run a web server, GET / six times, print who answered, stop it with
    SIGTERM; whether it answered and stopped cleanly, leaving nothing behind."""
    server = subprocess.Popen(command, cwd=ROOT, env=env)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 10
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    print(f"   {what} did not come up")
                    return False
                time.sleep(0.05)
        seen = set()
        for _ in range(6):
            reply = json.loads(urllib.request.urlopen(url, timeout=5).read())
            seen.add(reply["served_by"])
            flags = reply["flags"]
            print(f"   GET / -> served by pid {reply['served_by']}: counter={flags['counter']} "
                  f"{shown(flags)}(published by pid {flags['publisher']})")
            time.sleep(0.12)
        print(f"   {len(seen)} {what} worker(s) answered, each reading the same snapshot")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    left = psutil.Process().children(recursive=True)
    print(f"   {what} stopped (exit {server.returncode}); processes left: {len(left)}")
    return server.returncode == 0 and not left


if __name__ == "__main__":
    sys.exit(main())
