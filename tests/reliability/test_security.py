"""Security.

- The control socket and its directory are out of reach of another uid: tested as
  user ``nobody`` from a subprocess that drops privileges (the suite runs as root
  here; skipped otherwise). Each layer is checked on its own: the 0700 directory,
  the 0600 socket (through a hard link in a public directory), and the peer-uid
  check (through a link made world-writable).
- The table and the vars segments are mode 0600, owned by us, unreadable by nobody.
- A client cannot make the supervisor run code or read files: no pickle is ever
  loaded, and ``ensure()`` only starts declared targets whatever else a request
  carries.
- Names with path separators never reach a file name; names with NUL, control
  characters or 10 kB of text are rejected at every boundary before they reach a
  file name, a metric label or a log line; the names that are accepted appear
  escaped in metric labels and intact in log lines.
"""

from __future__ import annotations

import json
import os
import pickle
import pwd
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    ROOT,
    SEGMENT_RE,
    SHM,
    Evil,
    frame,
    published,
    raw_connect,
    raw_request,
    read_until_closed,
    resources,
    spec,
    state,
)
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

import bgpool
import bgpool.metrics

ROOT_ONLY = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to run a client as another uid (user nobody)"
)

AS_NOBODY = r"""
import json, os, socket, struct, sys
uid, gid = int(sys.argv[1]), int(sys.argv[2])
targets = json.loads(sys.argv[3])
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
out = {"uid": os.getuid(), "euid": os.geteuid()}

def attempt(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(path)
    except OSError as e:
        return "refused: " + type(e).__name__
    try:
        body = json.dumps({"op": "hello"}).encode()
        s.sendall(struct.pack(">I", len(body)) + body)
        data = s.recv(65536)
        return ("answered: " + data[4:].decode(errors="replace")) if data else "closed"
    except socket.timeout:
        return "left open"
    except OSError as e:
        return "closed: " + type(e).__name__
    finally:
        s.close()

for key, path in targets.get("sockets", {}).items():
    out[key] = attempt(path)
for key, path in targets.get("files", {}).items():
    try:
        open(path, "rb").close()
        out[key] = "opened"
    except OSError as e:
        out[key] = "refused: " + type(e).__name__
for key, path in targets.get("dirs", {}).items():
    try:
        os.listdir(path)
        out[key] = "listed"
    except OSError as e:
        out[key] = "refused: " + type(e).__name__
print(json.dumps(out))
"""


def _as_nobody(targets: dict[str, dict[str, str]]) -> dict[str, Any]:
    nobody = pwd.getpwnam("nobody")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            AS_NOBODY,
            str(nobody.pw_uid),
            str(nobody.pw_gid),
            json.dumps(targets),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    assert out["uid"] == out["euid"] == nobody.pw_uid, out
    return out


def _vars_pool(make_pool: Any) -> Any:
    pool = make_pool(
        [
            bgpool.WorkerSpec(
                name="flags", target="fixtures.vars_workers:publish_case", env={"CASE": "scalars"}
            ),
            spec("eager", "idle", num=1),
        ]
    )
    pool.ensure("flags")
    published(pool, "flags", timeout=5.0)
    return pool


# ----------------------------------------------------------------- modes, uids


def test_socket_directory_and_segments_are_private(make_pool: Any) -> None:
    pool = _vars_pool(make_pool)
    res = resources(pool)
    me = os.getuid()
    sock = os.stat(res.address)
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o600
    assert sock.st_uid == me
    directory = os.stat(res.directory)
    assert stat.S_IMODE(directory.st_mode) == 0o700 and directory.st_uid == me
    assert sorted(os.listdir(res.directory)) == ["control.sock"]
    segments = res.refresh_segments()
    assert res.table in segments and any(s.startswith(res.table + "_v") for s in segments)
    for name in segments:
        st = os.stat(SHM / name)
        assert stat.S_IMODE(st.st_mode) == 0o600, (name, oct(st.st_mode))
        assert st.st_uid == me, name
        assert SEGMENT_RE.match(name), name


@ROOT_ONLY
def test_another_uid_cannot_reach_the_pool(make_pool: Any) -> None:
    pool = _vars_pool(make_pool)
    res = resources(pool)
    segments = sorted(res.refresh_segments())
    out = _as_nobody(
        {
            "sockets": {"socket": res.address},
            "dirs": {"directory": str(res.directory)},
            "files": {f"segment {s}": str(SHM / s) for s in segments},
        }
    )
    assert out["socket"] == "refused: PermissionError", out
    assert out["directory"] == "refused: PermissionError", out
    for s in segments:
        assert out[f"segment {s}"] == "refused: PermissionError", out
    assert raw_request(res.address, {"op": "hello"})["ok"] is True


@ROOT_ONLY
def test_each_layer_refuses_another_uid_on_its_own(make_pool: Any) -> None:
    """Past the 0700 directory (a hard link in a public directory), the 0600 socket
    refuses nobody; past the socket's mode too (the link made world-writable), the
    supervisor's peer-uid check closes the connection without an answer."""
    pool = make_pool([spec("eager", "idle", num=1)])
    res = resources(pool)
    public = Path(tempfile.mkdtemp(prefix="bgpt-rel-public-", dir="/tmp"))
    try:
        os.chmod(public, 0o755)
        link = public / "control.sock"
        os.link(res.address, link)
        out = _as_nobody({"sockets": {"link 0600": str(link)}})
        assert out["link 0600"] == "refused: PermissionError", out
        os.chmod(link, 0o666)  # the same inode: the pool's socket is 0666 for now
        try:
            out = _as_nobody({"sockets": {"link 0666": str(link)}})
        finally:
            os.chmod(link, 0o600)
        assert out["link 0666"].startswith("closed"), out
    finally:
        shutil.rmtree(public, ignore_errors=True)
    assert stat.S_IMODE(os.stat(res.address).st_mode) == 0o600
    assert raw_request(res.address, {"op": "hello"})["ok"] is True
    pool.ensure("eager")


# ------------------------------------------------------------- no code from clients


def test_no_pickle_is_ever_loaded(make_pool: Any, sentinel_dir: Path) -> None:
    pool = make_pool([spec("eager", "idle", num=1), spec("lazy", "idle")])
    res = resources(pool)
    marker = sentinel_dir / "unpickled"
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        evil = pickle.dumps(Evil(str(marker)), protocol=protocol)
        for payload in (
            evil,
            struct.pack(">I", len(evil)) + evil,
            struct.pack("<I", len(evil)) + evil,
            struct.pack(">Q", len(evil)) + evil,
        ):
            with raw_connect(res.address) as sock:
                sock.sendall(payload)
                data, closed = read_until_closed(sock, timeout=2.0, stop_on_reply=True)
            assert closed and not data, (protocol, payload[:40], data)
    assert not marker.exists(), "the supervisor unpickled bytes sent by a client"
    pool.ensure("lazy", timeout=5)
    assert not marker.exists()


def test_a_client_cannot_choose_what_runs(
    make_pool: Any, sentinel_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests name workers; only declarations say what runs. A request that
    carries a target, a script, a module, an environment or a path (as a name or in
    any extra field) starts the declared target or nothing, and never imports or
    runs anything else (``fixtures/rel_evil.py`` would leave a file if it were)."""
    evil_dir = sentinel_dir / "evil"
    evil_dir.mkdir()
    monkeypatch.setenv("REL_EVIL_DIR", str(evil_dir))  # inherited by supervisor and workers
    notes = sentinel_dir / "notes"
    notes.mkdir()
    declared = "fixtures.workers:idle"
    pool = make_pool(
        [
            bgpool.WorkerSpec(name="lazy", target=declared, env={"NOTES": str(notes)}),
            bgpool.WorkerSpec(target=declared, max_instances=8, env={"NOTES": str(notes)}),
        ]
    )
    script = str(ROOT / "fixtures" / "rel_evil.py")
    extra = {
        "target": "fixtures.rel_evil:run",
        "script": script,
        "module": "fixtures.rel_evil",
        "env": {"PYTHONSTARTUP": script, "PYTHONPATH": "/tmp"},
        "args": [script],
        "sys_path": [str(ROOT / "fixtures")],
        "workers": [{"name": "x", "target": "fixtures.rel_evil:run", "num": 1}],
    }
    names = ["fixtures.rel_evil:run", script, "../fixtures/rel_evil.py", "rel_evil"]
    for name in names:
        reply = raw_request(pool.address, {"op": "ensure", "names": [name], "timeout": 10, **extra})
        assert reply["ok"] is True, reply
    reply = raw_request(pool.address, {"op": "ensure", "names": ["lazy"], "timeout": 10, **extra})
    assert reply["ok"] is True, reply
    for op in ("start", "restart", "hello"):
        raw_request(pool.address, {"op": op, **extra})
    reply = raw_request(pool.address, {"op": "diagnostics", "name": "/etc/passwd", **extra})
    assert "root:" not in json.dumps(reply), reply
    for name in [*names, "lazy"]:
        diag = pool.diagnostics(name)
        assert diag.target == declared, diag
        assert state(diag.state) in {"ready", "starting"}, diag
    hosted = {bytes.fromhex(p.name.split("~")[0]).decode() for p in notes.iterdir()}
    assert hosted == {*names, "lazy"}, hosted
    assert sorted(os.listdir(evil_dir)) == [], "a client made the pool import or run rel_evil"


# ------------------------------------------------------------------------- names

CONTROL = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) == "Cc"]


def test_names_with_any_control_character_are_rejected_everywhere(make_pool: Any) -> None:
    """Names have no NUL or other control character (README, "Declaring workers";
    Unicode category Cc: U+0000-U+001F, U+007F and the C1 controls U+0080-U+009F,
    among which U+0085 NEL and U+009B CSI): they would forge or break log lines."""
    pool = make_pool([spec(None, "idle", max_instances=64)])
    accepted = []
    for c in CONTROL:
        name = f"a{c}b"
        where = []
        try:
            pool.ensure(name, timeout=5)
            where.append("ensure()")
        except ValueError:
            pass
        try:
            bgpool.WorkerSpec(name=name, target="fixtures.workers:idle")
            where.append("WorkerSpec")
        except ValidationError:
            pass
        try:
            bgpool.next_scope(name)
            where.append("next_scope()")
        except ValueError:
            pass
        with raw_connect(pool.address) as sock:
            sock.sendall(frame({"op": "ensure", "names": [f"z{c}z"], "timeout": 5}))
            data, closed = read_until_closed(sock, timeout=2.0, stop_on_reply=True)
        if data or not closed:
            where.append("control socket")
        if where:
            accepted.append(f"U+{ord(c):04X} accepted by {', '.join(where)}")
    hosted = [s.name for s in pool.status()]
    assert not accepted, (
        f"{len(accepted)} control characters accepted in names: "
        + "; ".join(accepted[:3])
        + (f"; ... {accepted[-1]}" if len(accepted) > 3 else "")
        + f"; now hosted: {hosted!r:.200}"
    )


def test_10kb_names_are_rejected_everywhere(make_pool: Any, capfd: Any) -> None:
    pool = make_pool([spec(None, "idle"), spec("eager", "idle", num=1)])
    res = resources(pool)
    long = "L" * 10_000
    with pytest.raises(ValueError):
        pool.ensure(long)
    with pytest.raises(ValueError):
        pool.diagnostics(long)
    with pytest.raises(ValueError):
        pool.get_vars(long)
    with pytest.raises(ValidationError):
        bgpool.WorkerSpec(name=long, target="fixtures.workers:idle")
    with pytest.raises(ValueError):
        bgpool.next_scope(long)
    for message in (
        {"op": "ensure", "names": [long], "timeout": 5},
        {"op": "ensure", "names": ["ok", long], "timeout": 5},
        {"op": "diagnostics", "name": long},
        {"op": "locate", "name": long},
    ):
        with raw_connect(res.address) as sock:
            sock.sendall(frame(message))
            data, closed = read_until_closed(sock, timeout=2.0, stop_on_reply=True)
        assert closed and not data, (message["op"], data[:200])
    assert [s.name for s in pool.status()] == ["eager"], "nothing hosted"
    captured = capfd.readouterr()
    assert "L" * 129 not in captured.err + captured.out, "the long name reached a log line"
    assert not any("L" * 129 in p.name for p in SHM.iterdir())
    assert not any("L" * 129 in p for p in os.listdir(res.directory))


PATHS = ["../../../../tmp/bgpt-rel-escape", "a/b", "/etc/passwd", "..", ".", "bgp_0000", "~root"]


def test_path_like_names_never_reach_a_file_name(make_pool: Any) -> None:
    """A name may contain '/' (only NUL and control characters are forbidden), but no
    file is ever named after it: segments and the socket are named by the pool, and a
    catch-all name's vars live in a segment named by its slot."""
    pool = make_pool(
        [
            bgpool.WorkerSpec(
                target="fixtures.vars_workers:publish_case",
                max_instances=len(PATHS),
                env={"CASE": "text"},
            ),
        ]
    )
    res = resources(pool)
    pool.ensure(PATHS, timeout=10)
    for name in PATHS:
        published(pool, name, timeout=5.0)
        assert pool.get_vars(name)["uni"] == "héllo wörld ✓ 日本"
        assert pool.diagnostics(name).name == name
    assert sorted(s.name for s in pool.status()) == sorted(PATHS)
    segments = res.refresh_segments()
    assert len(segments) == 1 + len(PATHS), segments
    for name in segments:
        assert SEGMENT_RE.match(name), name
    assert sorted(os.listdir(res.directory)) == ["control.sock"]
    for base in (Path.cwd(), ROOT, res.directory, SHM, Path(tempfile.gettempdir())):
        for name in ("bgpt-rel-escape", "a", "b", "~root"):
            assert not (base / name).exists(), base / name
    assert not Path("/tmp/bgpt-rel-escape").exists()


ODD = ['quote"name', "back\\slash", "it's", "%s %d %(x)s", "{x}", "a:b", "é ✓ 日本", "</td>", "a b"]


def test_accepted_names_are_escaped_in_metrics_and_intact_in_logs(
    make_pool: Any, capfd: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BGPOOL_LOG_LEVEL", "INFO")
    pool = make_pool([spec(None, "idle", max_instances=len(ODD))])
    pool.ensure(ODD, timeout=10)
    registry = CollectorRegistry()
    bgpool.metrics.collector(pool, registry)
    text = generate_latest(registry).decode()
    labels = {
        sample.labels["worker"]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if family.name == "bgpool_total_workers"
    }
    assert labels == {f"m#:{name}" for name in ODD}, labels
    for label in labels:
        match = re.fullmatch(r"m#([^:]*):(.+)", label)
        assert match is not None and match.group(1) == "" and match.group(2) in ODD
    pool.shutdown()
    lines = capfd.readouterr().err.splitlines()
    for name in ODD:
        assert any(line.startswith("bgpool[") and f"{name}.0 ready" in line for line in lines), (
            name,
            lines[-20:],
        )
    odd_lines = [line for line in lines if not line.startswith("bgpool[")]
    assert not odd_lines, odd_lines[:5]
