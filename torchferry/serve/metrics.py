"""The server's Prometheus metrics, exposed at `/metrics`.

Under gunicorn with PROMETHEUS_MULTIPROC_DIR set, prometheus_client's multiprocess mode keeps each worker's
figures in that folder and `/metrics` adds up every worker's (torchferry/serve/gunicorn.conf.py empties the folder at
start and drops dead workers' gauges); otherwise the figures are this process's own.
"""

from __future__ import annotations

import os
from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """Requests by route and status, their latency, images classified, batch sizes, and readiness."""

    def __init__(self) -> None:
        # Imported here, not at module import: multiprocess mode is chosen when prometheus_client is imported.
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("torchferry_requests_total", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("torchferry_request_seconds", "request latency by route", ["route"],
                                 registry=self.registry, buckets=LATENCY_BUCKETS)
        self.images = Counter("torchferry_images_predicted_total",
                              "inputs predicted (images, texts or table rows; the name predates texts and rows)", registry=self.registry)
        self.batch = Histogram("torchferry_batch_size", "inputs (images, texts or rows) per ONNX Runtime call from /predict",
                               registry=self.registry, buckets=BATCH_BUCKETS)
        self.ready = Gauge("torchferry_ready", "1 when the model is loaded and proven", registry=self.registry,
                           multiprocess_mode="livemax")
        # (route, status) -> its counter and latency children: `labels()` takes the metric's lock and builds a key
        # on every call. Routes are the app's rules (and "unmatched"), statuses three digits, so this stays small.
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """One answered request."""
        children = self._children.get((route, status))
        if children is None:
            children = (self.requests.labels(route, str(status)), self.latency.labels(route))
            self._children[(route, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe_batch(self, images: int) -> None:
        """One batch of `images` classified."""
        self.images.inc(images)
        self.batch.observe(images)

    def set_ready(self, ready: bool) -> None:
        """Whether a proven model answers."""
        self.ready.set(1 if ready else 0)

    def exposition(self) -> tuple[bytes, str]:
        """The text format and its content type: every worker's figures in multiprocess mode, else ours."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

        registry = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
