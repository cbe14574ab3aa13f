"""Prometheus metrics of the API (`GET /metrics`, see api/routes/metrics.py).

Two kinds of figures:

- What this process sees happen — requests by route and status, 503 rejections, 504
  timeouts, webhook deliveries, janitor deletions — are prometheus-client Counters and
  Histograms in `REGISTRY`. With PROMETHEUS_MULTIPROC_DIR set (several API processes,
  `trifecta api --workers N`) prometheus-client keeps them in files there and a scrape
  of any process adds up all of them (MultiProcessCollector).
- The state of the whole service — Redis's used memory, maxmemory and keys, the expiry
  index's length, queue depth per queue, live workers, active sessions,
  and every worker's own figures (time in queue and in the model, batch sizes, dropped
  expired requests, cache hits, device memory) — is read from Redis at scrape time: the
  queues' lengths and the registration hash each worker rewrites on every heartbeat
  (workers/metrics.py puts its histograms there). Every API process reads the same Redis,
  so these are right whichever process answers the scrape.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tasks import keys

REGISTRY = CollectorRegistry(auto_describe=True)
MULTIPROC = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir"))

REQUESTS = Counter("trifecta_http_requests", "HTTP requests by route template, method and status.", ["route", "method", "status"], registry=REGISTRY)
LATENCY = Histogram(
    "trifecta_http_request_seconds", "Time to answer an HTTP request, by route template.", ["route"], registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
REJECTED = Counter("trifecta_rejected", "Requests answered 503 (queue full, no live worker, broker down), by route and error code.", ["route", "code"], registry=REGISTRY)
TIMEOUTS = Counter("trifecta_timeouts", "Sync requests answered 504 (no result within the timeout), by route.", ["route"], registry=REGISTRY)
JANITOR_DELETED = Counter("trifecta_janitor_deleted_objects", "Stored objects deleted because their job's record expired (RESULT_TTL_SECONDS).", registry=REGISTRY)

if not MULTIPROC:
    from prometheus_client import ProcessCollector

    ProcessCollector(registry=REGISTRY)


def _route_of(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path:
        return str(path)
    # answered before routing (the admission gate's 503, the tenant gate's 401/429): name
    # the route it was meant for, so the answer is counted where a person looks for it
    app = scope.get("app")
    for rx, template in _templates(app) if app is not None else ():
        if rx.fullmatch(scope.get("path", "")):
            return template
    return "unmatched"


_TEMPLATE_CACHE: dict[int, list[tuple[re.Pattern[str], str]]] = {}


def _templates(app: Any) -> list[tuple[re.Pattern[str], str]]:
    """The app's path templates (from its OpenAPI schema, which FastAPI caches), static ones first."""
    key = id(app)
    if key not in _TEMPLATE_CACHE:
        try:
            paths = list(app.openapi().get("paths", {}))
        except Exception:  # noqa: BLE001 - no schema: every unrouted answer is "unmatched"
            paths = []
        paths.sort(key=lambda t: (t.count("{"), -len(t)))
        _TEMPLATE_CACHE[key] = [(re.compile(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(t))), t) for t in paths]
    return _TEMPLATE_CACHE[key]


class MetricsMiddleware:
    """Counts every request by its route template (never the raw path: job ids would explode the label set)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500
        body = bytearray()

        async def _send(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = int(msg["status"])
            elif msg["type"] == "http.response.body" and status in (503, 504) and len(body) < 4096:
                body.extend(msg.get("body", b"")[:4096])
            await send(msg)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = _route_of(scope)
            if route != "/metrics":
                REQUESTS.labels(route, scope.get("method", ""), str(status)).inc()
                LATENCY.labels(route).observe(time.perf_counter() - t0)
            if status == 503:
                REJECTED.labels(route, _error_code(bytes(body))).inc()
            elif status == 504:
                TIMEOUTS.labels(route).inc()


def _error_code(body: bytes) -> str:
    try:
        return str(orjson.loads(body)["error"]["code"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "unknown"


# ---------------------------------------------------------------- the live view from Redis
async def snapshot(hub: Any) -> dict[str, Any]:
    """Everything the live collector needs, read in two pipelines."""
    workers = [w for ws in hub.workers.values() for w in ws]
    queues = sorted({q for w in workers for q in w.queues if q} | {keys.shared_queue(m) for m in hub.depth} | {keys.shard_queue(m) for m in hub.depth})
    depths: dict[str, int] = {}
    webhook = {"queued": 0, "scheduled": 0}
    redis: dict[str, Any] = {}
    try:
        pipe = hub.redis.pipeline(transaction=False)
        lists = {q: hub.qkeys.all_lists(q) for q in queues}  # a queue's Redis lists (kombu's prefix, priorities): its depth is their sum
        for q in queues:
            for k in lists[q]:
                pipe.llen(k)
        pipe.llen(keys.WEBHOOK_QUEUE)
        pipe.zcard(keys.WEBHOOK_SCHEDULE)
        pipe.zcard(keys.EXPIRY)
        pipe.info("memory")
        pipe.info("keyspace")
        res = await pipe.execute()
        lens = iter(int(x) for x in res[: sum(len(v) for v in lists.values())])
        depths = {q: sum(next(lens) for _ in lists[q]) for q in queues}
        webhook = {"queued": int(res[-5]), "scheduled": int(res[-4])}
        mem, space = res[-2], res[-1]
        redis = {
            "used": int(mem.get("used_memory", 0)), "max": int(mem.get("maxmemory", 0) or 0), "expiry_index": int(res[-3]),
            "keys": {db: (int(v.get("keys", 0)), int(v.get("expires", 0))) for db, v in space.items() if isinstance(v, dict)},
        }
        redis_up = True
    except Exception:  # noqa: BLE001 - a scrape while Redis is down still answers, with redis_up 0
        redis_up = False
    return {"workers": workers, "depths": depths, "webhook": webhook, "redis_up": redis_up and hub.redis_ok, "models": list(hub.depth), "redis": redis}


class LiveCollector(Collector):
    def __init__(self, snap: dict[str, Any]) -> None:
        self.s = snap

    def collect(self) -> Iterator[Metric]:
        s = self.s
        g = GaugeMetricFamily("trifecta_redis_up", "1 when the API reaches Redis (broker and job store).")
        g.add_metric([], 1.0 if s["redis_up"] else 0.0)
        yield g
        yield from _redis_metrics(s.get("redis") or {})
        g = GaugeMetricFamily("trifecta_queue_depth", "Messages waiting in each queue (shared <model>, private <model>.<worker>, shard jobs <model>:shards).", labels=["queue"])
        for q, n in sorted(s["depths"].items()):
            g.add_metric([q], n)
        yield g
        workers = s["workers"]
        live = GaugeMetricFamily("trifecta_workers_live", "Workers whose heartbeat is current, by model.", labels=["model"])
        sess = GaugeMetricFamily("trifecta_active_sessions", "Open (video) sessions held by the workers, by model.", labels=["model"])
        for m in s["models"]:
            ws = [w for w in workers if w.model == m]
            live.add_metric([m], len(ws))
            sess.add_metric([m], sum(_int(w.raw.get("sessions")) for w in ws))
        yield live
        yield sess
        g = GaugeMetricFamily("trifecta_webhooks_pending", "Webhooks waiting: queued (new) and scheduled (retries and in-flight leases).", labels=["state"])
        g.add_metric(["queued"], s["webhook"]["queued"])
        g.add_metric(["scheduled"], s["webhook"]["scheduled"])
        yield g
        yield from _worker_metrics(workers)


def _redis_metrics(r: dict[str, Any]) -> Iterable[Metric]:
    if not r:
        return
    g = GaugeMetricFamily("trifecta_redis_used_memory_bytes", "Memory Redis has allocated (INFO memory used_memory).")
    g.add_metric([], r["used"])
    yield g
    g = GaugeMetricFamily("trifecta_redis_maxmemory_bytes", "Redis's maxmemory (0 = no limit); new work gets 503 past REDIS_MEMORY_ADMIT_RATIO of it.")
    g.add_metric([], r["max"])
    yield g
    keys_ = GaugeMetricFamily("trifecta_redis_keys", "Keys in each Redis database.", labels=["db"])
    exp = GaugeMetricFamily("trifecta_redis_expiring_keys", "Keys with a TTL in each Redis database.", labels=["db"])
    for db, (n, e) in sorted(r["keys"].items()):
        keys_.add_metric([db], n)
        exp.add_metric([db], e)
    yield keys_
    yield exp
    g = GaugeMetricFamily("trifecta_expiry_index_entries", "Storage prefixes waiting in the expiry index (tf:expiry) for their record to expire and the janitor to delete them.")
    g.add_metric([], r["expiry_index"])
    yield g


def _int(v: Any) -> int:
    try:
        return int(float(v or 0))
    except (TypeError, ValueError):
        return 0


def _worker_metrics(workers: list[Any]) -> Iterable[Metric]:
    lab = ["worker", "model", "device"]
    in_flight = GaugeMetricFamily("trifecta_worker_in_flight", "Requests a worker is working on now.", labels=lab)
    processed = CounterMetricFamily("trifecta_worker_processed", "Requests a worker finished successfully since it started.", labels=lab)
    failed = CounterMetricFamily("trifecta_worker_failed", "Requests a worker finished as failed since it started.", labels=lab)
    batches = CounterMetricFamily("trifecta_worker_batches", "Batches (model calls) a worker ran since it started.", labels=lab)
    dropped = CounterMetricFamily("trifecta_worker_dropped_expired", "Requests dropped unrun because their deadline passed while queued.", labels=lab)
    rss = GaugeMetricFamily("trifecta_worker_rss_bytes", "Resident memory of a worker process.", labels=lab)
    mem_limit = GaugeMetricFamily("trifecta_worker_memory_limit_bytes", "Memory a worker may use: the smaller of WORKER_MAX_MEMORY_MB and its container's limit; 0 = none.", labels=lab)
    gpu = GaugeMetricFamily("trifecta_worker_gpu_memory_bytes", "Device memory allocated by a worker on its GPU (GPU workers only).", labels=lab)
    age = GaugeMetricFamily("trifecta_worker_heartbeat_age_seconds", "Seconds since a worker's last heartbeat.", labels=lab)
    hits = CounterMetricFamily("trifecta_cache_hits", "Cache hits of a worker's caches (e.g. SAM3 image features).", labels=[*lab, "cache"])
    misses = CounterMetricFamily("trifecta_cache_misses", "Cache misses of a worker's caches.", labels=[*lab, "cache"])
    hists: dict[str, HistogramMetricFamily] = {
        "queue_seconds": HistogramMetricFamily("trifecta_queue_wait_seconds", "Time a request waited between submit and its batch starting, per worker.", labels=lab),
        "model_seconds": HistogramMetricFamily("trifecta_model_seconds", "Time a request's batch spent in the model (prepare + predict), per worker.", labels=lab),
        "batch_size": HistogramMetricFamily("trifecta_batch_size", "Requests per model call, per worker.", labels=lab),
    }
    now = time.time()
    for w in workers:
        v = [w.id, w.model, w.device]
        raw = w.raw
        in_flight.add_metric(v, w.in_flight)
        processed.add_metric(v, w.processed)
        failed.add_metric(v, w.failed)
        batches.add_metric(v, _int(raw.get("batches")))
        rss.add_metric(v, w.rss_mb * 1e6)
        mem_limit.add_metric(v, float(raw.get("memory_limit_mb") or 0) * 1e6)
        age.add_metric(v, max(0.0, now - w.heartbeat))
        if w.device.startswith("cuda"):
            gpu.add_metric(v, w.gpu_memory_mb * 1e6)
        m = _loads(raw.get("metrics"))
        dropped.add_metric(v, _int(m.get("dropped_expired", raw.get("dropped_expired"))))
        for name, h in m.get("histograms", {}).items():
            fam = hists.get(name)
            if fam is not None and h.get("buckets"):
                fam.add_metric(v, [(str(le), float(c)) for le, c in h["buckets"]], float(h.get("sum", 0.0)))
        for cache, st in _caches(w.info).items():
            hits.add_metric([*v, cache], st[0])
            misses.add_metric([*v, cache], st[1])
    yield from (in_flight, processed, failed, batches, dropped, rss, mem_limit, gpu, age, hits, misses, *hists.values())


def _loads(s: str | None) -> dict[str, Any]:
    if not s:
        return {}
    try:
        d = orjson.loads(s)
        return d if isinstance(d, dict) else {}
    except orjson.JSONDecodeError:
        return {}


def _caches(info: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Caches a runner reports in its info: `cache_hits`/`cache_misses`, or `{name: {"hits", "misses"}}`."""
    out: dict[str, tuple[int, int]] = {}
    if "cache_hits" in info:
        out["default"] = (_int(info.get("cache_hits")), _int(info.get("cache_misses")))
    for k, v in info.items():
        if isinstance(v, dict) and "hits" in v:
            out[k] = (_int(v.get("hits")), _int(v.get("misses")))
    return out


def exposition(snap: dict[str, Any]) -> bytes:
    from prometheus_client import generate_latest

    reg = CollectorRegistry(auto_describe=False)
    if MULTIPROC:
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(reg)
    else:
        reg.register(_Forward(REGISTRY))
    reg.register(LiveCollector(snap))
    return generate_latest(reg)


class _Forward(Collector):
    def __init__(self, reg: CollectorRegistry) -> None:
        self.reg = reg

    def collect(self) -> Iterator[Metric]:
        yield from self.reg.collect()
