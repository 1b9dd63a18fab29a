"""The README's Kubernetes Deployment (deploy/kubernetes.yaml, shown in the
README as it is: tests/test_readme.py checks the copy) agrees with the pool it
runs (deploy/config.py): parsed with PyYAML, its command, probes, port,
annotations and grace period checked against the config; then its command
is run as the pod would run it (in the repository's root, its /app), with
its ports moved to free ones on 127.0.0.1, and the probes' paths asked.
"""

from __future__ import annotations

import functools
import math
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml
from helpers import ROOT, BgpoolRun, LeakCheck, free_port, http_get, since, wait_for

from bgpool import PoolConfig
from bgpool.cli.config import load_config

MANIFEST = ROOT / "deploy" / "kubernetes.yaml"

KILL_SECOND = 1.0
"""From SIGTERM to SIGKILL of a worker that outlives its drain."""

MARGIN = 2.0
"""The least margin the pod's grace period must leave past bgpool's own
and the server's."""

LIVENESS_DEADLINE = 1.0
"""What `/livez` gives the supervisor's loop: a probe's timeout must be longer."""

PATH = f"{Path(sys.executable).parent}:/usr/bin:/bin"
"""This environment's scripts first, so that the server is its `uvicorn`."""


def deployment() -> dict[str, Any]:
    (document,) = list(yaml.safe_load_all(MANIFEST.read_text()))
    assert (document["apiVersion"], document["kind"]) == ("apps/v1", "Deployment")
    found: dict[str, Any] = document
    return found


def container(document: dict[str, Any]) -> dict[str, Any]:
    (found,) = document["spec"]["template"]["spec"]["containers"]
    assert isinstance(found, dict)
    return found


def option(args: list[str], name: str) -> str | None:
    """The value of ``--name=V`` or ``--name V`` in ``args``."""
    for i, arg in enumerate(args):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(args):
            return args[i + 1]
    return None


def its_config(app: dict[str, Any]) -> tuple[str, PoolConfig, list[str]]:
    """The config path of ``bgpool run CONFIG -- SERVER...``, the config, and SERVER."""
    command = app["command"] + app.get("args", [])
    assert command[:2] == ["bgpool", "run"], command
    assert command[3] == "--" and len(command) > 4, "bgpool run CONFIG -- SERVER"
    assert app["workingDir"] == "/app"  # the repository's root in the image
    path = command[2]
    assert (ROOT / path).is_file(), path
    return path, load_config(str(ROOT / path)), command[4:]


def probe_port(app: dict[str, Any], probe: dict[str, Any]) -> int:
    """The container port a probe's ``httpGet`` reaches (by name or number)."""
    port = probe["httpGet"]["port"]
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in app["ports"] if p.get("name") == port]
    assert isinstance(found, int)
    return found


def test_the_manifest_agrees_with_its_pool() -> None:
    document = deployment()
    pod = document["spec"]["template"]
    assert document["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    app = container(document)
    _, config, server = its_config(app)
    assert config.metrics_port is not None, "the probes need the metrics port"
    assert config.metrics_host == "0.0.0.0", "the kubelet probes from outside the container"
    assert config.metrics_port in [p["containerPort"] for p in app["ports"]]

    probes = {kind: app[kind] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    for kind, probe in probes.items():
        assert probe_port(app, probe) == config.metrics_port, kind
        assert probe.get("timeoutSeconds", 1) > LIVENESS_DEADLINE or kind != "livenessProbe"
    assert probes["startupProbe"]["httpGet"]["path"] == "/livez"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/livez"
    ready = urlsplit(probes["readinessProbe"]["httpGet"]["path"])
    assert ready.path == "/readyz"
    query = parse_qs(ready.query)
    declared = {(w.scope.label, w.name) for w in config.workers}
    for name in query.get("worker", []):
        assert (query.get("scope", [""])[0], name) in declared, name
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= config.ensure_timeout

    annotations = pod["metadata"]["annotations"]
    assert all(isinstance(v, str) for v in annotations.values()), "annotations are strings"
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(config.metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"

    # SIGTERM reaches `bgpool run`, which passes it to the server; once the
    # server has exited the pool drains: grace_period, then the kill second
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    server_stop = float(option(server, "--timeout-graceful-shutdown") or 0)
    assert isinstance(grace, int)
    assert grace >= math.ceil(config.grace_period + KILL_SECOND + server_stop + MARGIN), grace


def test_the_manifests_command_serves_its_probes(tmp_path: Path, no_leaks: LeakCheck) -> None:
    document = deployment()
    app = container(document)
    path, _, server = its_config(app)
    metrics, http = free_port(), free_port()
    moved = [re.sub(r"^--host=.*", "--host=127.0.0.1", a) for a in server]
    moved = [re.sub(r"^--port=.*", f"--port={http}", a) for a in moved]
    assert moved != server, "the server's host and port are given as --host= and --port="
    run = BgpoolRun(
        path, tmp_path, "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics),
        "--", *moved, unbuffered=True, env={"PATH": PATH},
    )  # fmt: skip
    try:
        no_leaks.track(run.address())
        paths = {kind: app[kind]["httpGet"]["path"] for kind in
                 ("startupProbe", "livenessProbe", "readinessProbe")}  # fmt: skip

        def answered(kind: str) -> bool:
            assert run.proc.poll() is None, run.text() + run.stderr()
            try:
                return http_get(metrics, paths[kind])[0] == 200
            except OSError:
                return False

        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            wait_for(functools.partial(answered, kind), timeout=30, what=kind)
        assert http_get(metrics, "/metrics")[0] == 200

        # the pod's termination: SIGTERM, and all of it gone within its grace period
        t0 = time.monotonic()
        assert run.stop(signal.SIGTERM, timeout=60) == 0, run.text() + run.stderr()
        took = since(t0)
        assert took < document["spec"]["template"]["spec"]["terminationGracePeriodSeconds"], took
    finally:
        run.close()
