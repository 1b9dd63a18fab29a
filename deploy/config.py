"""The pool of the Kubernetes example (deploy/kubernetes.yaml): its container
runs `bgpool run deploy/config.py -- uvicorn fixtures.asgiapp.app:app ...` in
/app, a copy of this repository with bgpool installed. The workers are the ASGI
fixture app's; the metrics port is open to the pod's network (the kubelet's
probes and Prometheus come from outside the container), and `grace_period`
is what the manifest's `terminationGracePeriodSeconds` is sized from.

`flags` is lazy: each uvicorn server process ensures it in its lifespan, so
`/readyz?worker=flags` turns 200 once the server has started and its
dependency is ready (tests/test_kubernetes.py checks all of this).
"""

from bgpool import PoolConfig, WorkerSpec

config = PoolConfig(
    workers=[WorkerSpec(name="flags", target="fixtures.asgiapp.workers:flags", ready_on="vars")],
    grace_period=20.0,
    metrics_port=9187,
    metrics_host="0.0.0.0",
)
