"""bgpool's Prometheus metrics, for an application's own registry:

    registry = CollectorRegistry()
    bgpool.metrics.collector(pool, registry)

The public import path of `bgpool.app.metrics`, where they are built.
"""

from __future__ import annotations

from .app.metrics import TableCollector, collector, worker_label

__all__ = ["TableCollector", "collector", "worker_label"]
