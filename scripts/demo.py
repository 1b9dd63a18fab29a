"""The bgpool demo: one pool from fixtures/demo/config.py, start to clean shutdown,
then a gunicorn application whose workers read vars a bgpool worker publishes, an
ASGI application (Starlette under uvicorn) that awaits its workers with aensure(),
then a worker that requires another and one killed as hung, the probes and the
status page, and a singleton shared by two pools through a private redis-server.

Run it with ./scripts/demo (which sets up .venv first).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import timeit
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import redis  # noqa: E402

import bgpool  # noqa: E402
from fixtures.demo.config import config, policies, probes, singletons  # noqa: E402

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


class DemoFailed(Exception):
    """What a step showed did not happen: the demo stops, loudly."""


def check(ok: bool, what: str) -> None:
    """Stop the demo unless `what`, which the step just told the reader, is true."""
    if not ok:
        raise DemoFailed(f"the demo showed something that did not happen: {what}")


def show(pool: bgpool.Pool) -> None:
    print(f"   {'worker':<12} {'state':<9} {'pid':>7} {'attempts':>8} {'last exit':>9}")
    for s in pool.status():
        last = "" if s.last_exit_status is None else s.last_exit_status
        print(f"   {s.name:<12} {s.state:<9} {s.pid or '':>7} {s.attempts:>8} {last:>9}")


def wait_for(predicate, timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the demo waited too long{' for ' if what else ''}{what}")
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
    policies_demo()
    probes_demo()
    singleton_demo()
    left = psutil.Process().children(recursive=True)
    print(f"\n   child processes left after steps 7 to 12: {len(left)}")
    print(f"\ndemo finished in {time.monotonic() - begin:.1f} s")
    return 1 if leftovers or left or os.path.exists(table) or not web_ok else 0


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


def policies_demo() -> None:
    step("10. lifecycle policies: 'api' requires 'db-proxy'; 'poller' (heartbeat_timeout=0.5) "
         "hangs")
    print("   (fixtures/demo/config.py's `policies`: db-proxy is lazy, started by start() first "
          "because\n    the eager api requires it; api is spawned once db-proxy is ready)")
    expect("'poller' stops heartbeating once it is ready, and is killed as hung")
    with bgpool.Pool(policies) as pool:
        first = {s.name: s for s in pool.status()}
        proxy, api = first["db-proxy"], first["api"]
        check(proxy.ready_at is not None and api.started_at is not None
              and api.started_at >= proxy.ready_at, "api was spawned after db-proxy was ready")
        assert proxy.ready_at is not None and api.started_at is not None
        gap = (api.started_at - proxy.ready_at).total_seconds() * 1000
        print(f"   db-proxy ready at {proxy.ready_at:%H:%M:%S.%f}, api spawned {gap:.1f} ms later")

        def poller() -> bgpool.WorkerStatus:
            return next(s for s in pool.status() if s.name == "poller")

        hung_pid = first["poller"].pid
        wait_for(lambda: poller().hangs >= 1 and poller().state == "ready"
                 and poller().pid != hung_pid, what="poller to be killed as hung and restarted")
        error = pool.diagnostics("poller").last_error
        check(error is not None and error.type == "Hung", "poller's last error is a Hung")
        assert error is not None
        now = poller()
        print(f"   poller pid {hung_pid}: {error.type}: {error.message}")
        print(f"   poller: hangs={now.hangs}, restarted as pid {now.pid} ({now.state}); this run "
              "heartbeats with tick()")


def get(url: str) -> tuple[int, bytes]:
    """GET `url`: its status code and body, whatever the code."""
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as reply:
        return reply.code, reply.read()


def probes_demo() -> None:
    step("11. probes and the status page: metrics_port=0 serves them on a free port")
    with bgpool.Pool(probes) as pool:
        base = f"http://127.0.0.1:{pool.metrics_port}"
        probe(base, "/livez", 200)
        probe(base, "/readyz?worker=clock", 200)
        probe(base, "/readyz?worker=mailer", 503, "(lazy: not started yet)")
        pool.ensure("mailer")
        probe(base, "/readyz?worker=mailer", 200, "(after ensure('mailer'))")
        code, body = get(f"{base}/status.json")
        page = json.loads(body)
        print(f"   GET /status.json -> {code}:")
        for counters in page["counters"]:  # one per worker name
            states = [f"{s['state']} (pid {s['pid']})" for s in page["status"]
                      if s["name"] == counters["name"]]  # fmt: skip
            print(f"      {counters['name']}: {', '.join(states)}, {counters['boots']} boot(s) "
                  f"in {counters['boot_seconds_sum'] * 1000:.1f} ms, {counters['restarts']} "
                  f"restarts, {counters['crashes']} crashes")
        check(code == 200 and [c["name"] for c in page["counters"]] == ["clock", "mailer"],
              "/status.json lists clock and mailer")
        code, body = get(f"{base}/")
        check(code == 200 and b"<html" in body.lower(), "/ serves the status page")
        print(f"   the status page: {base}/ (open it in a browser while a pool runs: "
              "`bgpool run\n    fixtures/demo/config.py --metrics-port 9187` keeps one up "
              "at http://127.0.0.1:9187/)")
        supervisor = page["pool"]["supervisor_pid"]
        print(f"   SIGSTOP to the supervisor (pid {supervisor}, /status.json's "
              "pool.supervisor_pid):")
        os.kill(supervisor, signal.SIGSTOP)
        try:
            probe(base, "/livez", 503, "(its loop does not answer within 1 s)")
        finally:
            os.kill(supervisor, signal.SIGCONT)
        print("   SIGCONT:")
        probe(base, "/livez", 200)


def probe(base: str, path: str, expected: int, note: str = "") -> None:
    """GET `path`, print its code and body, check the code."""
    code, body = get(base + path)
    print(f"   GET {path} -> {code} {body.decode().strip()} {note}".rstrip())
    check(code == expected, f"GET {path} answers {expected}")


TAKEOVER_SLACK = 1.0
"""Seconds step 12 allows beyond the takeover bound, for a loaded machine."""


def singleton_demo() -> None:
    step("12. singletons across hosts: two pools share a Redis and a name; 'cron' runs on one")
    server = shutil.which("redis-server")
    check(server is not None, "redis-server is installed (./scripts/demo installs it)")
    assert server is not None
    directory = Path(tempfile.mkdtemp(prefix="bgpool-demo-"))
    store = directory / "redis.sock"
    redis_server = subprocess.Popen(
        [server, "--port", "0", "--unixsocket", str(store), "--unixsocketperm", "700",
         "--save", "", "--appendonly", "no", "--dir", str(directory),
         "--logfile", str(directory / "redis.log")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    hosts: list[subprocess.Popen[bytes]] = []
    url = f"unix://{store}"
    ttl = singletons(url).lease_ttl
    clients = contextlib.ExitStack()
    try:
        wait_for(lambda: answers(store), what="redis-server to answer")
        print(f"   a private redis-server on {url};\n   hosts a and b are two processes "
              "(fixtures/demo/host.py), each with an XDG_RUNTIME_DIR of its own,\n   as if on "
              "hosts of their own, each owning a pool of `singletons` (name 'demo-singletons', "
              f"lease_ttl={ttl})")
        print("   (a's first lease on a fresh Redis waits one lease_ttl first: a holder from "
              "before might still run)")
        a = clients.enter_context(start_host(directory, "a", url, hosts))
        wait_for(lambda: (lease := a.diagnostics("cron").holder) is not None and lease.here,
                 what="host a to take cron's lease")
        b = clients.enter_context(start_host(directory, "b", url, hosts))  # while a waits
        a.ensure("cron")
        b.ensure("cron")  # returns: ready somewhere
        held = a.diagnostics("cron").holder
        check(held is not None and held.here, "host a holds cron's lease")
        assert held is not None
        wait_for(lambda: singleton(b).state == "standby", what="cron on standby on host b")
        holder = b.diagnostics("cron").holder
        check(holder is not None and not holder.here and holder.lease_token == held.lease_token,
              "host b sees host a's lease")
        assert holder is not None
        print(f"   host b: cron {singleton(b).state}, holder: host {holder.host}, supervisor pid "
              f"{holder.pid}, since {holder.since:%H:%M:%S}, token {holder.lease_token}")
        print("   host a shuts down (it releases the lease once its cron has exited):")
        t = time.monotonic()
        stop_host(hosts[0])
        wait_for(lambda: singleton(b).state == "ready", what="host b to take cron over")
        took = time.monotonic() - t
        taken = b.diagnostics("cron").holder
        check(taken is not None and taken.here and taken.lease_token > held.lease_token,
              "host b holds the lease with a larger token")
        bound = ttl + ttl / 3  # SPEC: lease_ttl plus a renewal period of the holder's loss
        check(took < bound + TAKEOVER_SLACK, f"host b took over within {bound:.2f} s")
        assert taken is not None
        print(f"   host b took over {took:.2f} s after a's shutdown began (bound: lease_ttl plus a "
              f"renewal period, {bound:.2f} s),\n   token {taken.lease_token} > {held.lease_token}")
    finally:
        clients.close()
        for host in hosts:
            stop_host(host)
        redis_server.terminate()
        redis_server.wait(10)
        shutil.rmtree(directory, ignore_errors=True)
    print("   both pools shut down, redis-server stopped, its directory removed")


def answers(store: Path) -> bool:
    """Whether the redis-server on socket `store` answers PING."""
    try:
        with redis.Redis(unix_socket_path=str(store), socket_timeout=1) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


def start_host(
    directory: Path, name: str, url: str, hosts: list[subprocess.Popen[bytes]]
) -> bgpool.PoolClient:
    """Start fixtures/demo/host.py as host `name` (added to `hosts`); a client
    of its pool once its start() returned."""
    runtime = directory / name
    runtime.mkdir(mode=0o700)
    info = directory / f"{name}.address"
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "PYTHONPATH": str(ROOT),
           "DEMO_HOST": name}  # fmt: skip
    host = subprocess.Popen([sys.executable, "-m", "fixtures.demo.host", url, str(info)],
                            cwd=ROOT, env=env, stdin=subprocess.PIPE)  # fmt: skip
    hosts.append(host)
    wait_for(lambda: info.exists() or host.poll() is not None, what=f"host {name}'s pool")
    check(info.exists(), f"host {name}'s pool started")
    return bgpool.connect(info.read_text())


def stop_host(host: subprocess.Popen[bytes]) -> None:
    """Close the host's stdin (its pool shuts down) and wait for it; kill it
    if it does not stop within its grace period and then some."""
    if host.stdin is not None and not host.stdin.closed:
        host.stdin.close()
    try:
        host.wait(10)
    except subprocess.TimeoutExpired:
        host.kill()
        host.wait()


def singleton(client: bgpool.PoolClient) -> bgpool.WorkerStatus:
    return next(s for s in client.status() if s.name == "cron")


if __name__ == "__main__":
    sys.exit(main())
