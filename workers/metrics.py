"""A worker's own figures: time in queue, time in the model, batch sizes, dropped requests.

Kept in prometheus-client Histograms/Counters in a registry of the worker's own, which
  - is served on WORKER_METRICS_PORT when that is set (one scrape target per worker), and
  - is summarised into the `metrics` field of the registration hash the worker rewrites on
    every heartbeat, so the API's /metrics shows every worker's figures (per device)
    without scraping the workers at all.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger("trifecta.worker")

QUEUE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
MODEL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class WorkerMetrics:
    def __init__(self, model: str, device: str, worker_id: str) -> None:
        self.registry = CollectorRegistry()
        lab = {"model": model, "device": device, "worker": worker_id}
        names = list(lab)
        self._parents = {
            "queue_seconds": Histogram("trifecta_queue_wait_seconds", "Time a request waited between submit and its batch starting.", names, buckets=QUEUE_BUCKETS, registry=self.registry),
            "model_seconds": Histogram("trifecta_model_seconds", "Time a request's batch spent in the model (prepare + predict).", names, buckets=MODEL_BUCKETS, registry=self.registry),
            "batch_size": Histogram("trifecta_batch_size", "Requests per model call.", names, buckets=BATCH_BUCKETS, registry=self.registry),
        }
        self._queue = self._parents["queue_seconds"].labels(**lab)
        self._model = self._parents["model_seconds"].labels(**lab)
        self._batch = self._parents["batch_size"].labels(**lab)
        self._requests = Counter("trifecta_worker_requests", "Requests finished, by status.", [*names, "status"], registry=self.registry)
        self._dropped = Counter("trifecta_worker_dropped_expired", "Requests dropped unrun because their deadline passed while queued.", names, registry=self.registry).labels(**lab)
        self.gpu_memory = Gauge("trifecta_worker_gpu_memory_bytes", "Device memory allocated on this worker's GPU (0 on a CPU).", names, registry=self.registry).labels(**lab)
        self.rss = Gauge("trifecta_worker_rss_bytes", "Resident memory of this worker process.", names, registry=self.registry).labels(**lab)
        self.memory_limit = Gauge(
            "trifecta_worker_memory_limit_bytes", "Memory this worker may use: the smaller of WORKER_MAX_MEMORY_MB and its container's limit; 0 = none.", names, registry=self.registry
        ).labels(**lab)
        self._lab = lab
        self.dropped_expired = 0
        self._lock = threading.Lock()

    def observe(self, done: list[tuple[Any, str, dict[str, Any]]], t_start: float, model_ms: float, batch: int) -> None:
        """One batch finished: `done` is the worker's list of (request, status, body)."""
        if batch:
            self._batch.observe(batch)
        for q, status, body in done:
            self._requests.labels(**self._lab, status=status).inc()
            if status == "failed" and body.get("code") == "deadline_exceeded":
                self._dropped.inc()
                with self._lock:
                    self.dropped_expired += 1
                continue
            created = getattr(q, "created", None)
            if created:
                self._queue.observe(max(0.0, t_start - float(created)))
            if status == "succeeded":
                self._model.observe(model_ms / 1000)

    def registration_field(self) -> str:
        """JSON for the registration hash: cumulative buckets `[[le, count], …]`, sum and count per histogram."""
        out: dict[str, Any] = {"dropped_expired": self.dropped_expired, "histograms": {}}
        for name, h in self._parents.items():
            buckets: list[list[Any]] = []
            total = 0.0
            count = 0.0
            for metric in h.collect():
                for s in metric.samples:
                    if s.name.endswith("_bucket"):
                        buckets.append([s.labels["le"], s.value])
                    elif s.name.endswith("_sum"):
                        total = s.value
                    elif s.name.endswith("_count"):
                        count = s.value
            out["histograms"][name] = {"buckets": buckets, "sum": total, "count": count}
        return orjson.dumps(out).decode()

    def serve(self, port: int) -> None:
        """Serve this registry on `port` (all interfaces: a scrape comes from the Prometheus host)."""
        from prometheus_client import start_http_server

        start_http_server(port, registry=self.registry)
        log.info("worker metrics on :%d/metrics", port)
