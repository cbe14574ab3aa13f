"""The worker's batch: start, read inputs, run the model, write outputs, record and reply (`WorkerService`).

The process around it is workers/main.py (`run_worker`); the worker's registration, heartbeat
and leaving are workers/membership.py; its task events workers/events.py.

Per batch the worker makes two Redis round trips besides the broker's own: one
pipeline that counts each delivery and marks the jobs running (a Lua script refuses
cancelled or finished jobs, and dead-letters a job over MAX_DELIVERIES), and one that
writes every result and publishes it to the waiting API. Outputs are written to storage
under the job's own prefix at fixed keys, so a redelivered message rewrites the same
objects: publishing is idempotent.

Lifetimes: a sync request answered in time keeps its record SYNC_RESULT_TTL_S (FINISH
shortens it, unless the API detached it with a 504) and its stored outputs are put in the
expiry index for the same time; with STORE_SYNC_RESULTS=false its outputs travel in the
reply only. The FINISH transaction (results, expiry index, acks) lands whole or not at all:
at Redis's maxmemory it is retried until it fits, never acked unrecorded.
"""

from __future__ import annotations

import base64
import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import redis
from redis.exceptions import OutOfMemoryError

from storage.blob import BlobStore, FileStore, open_store
from tasks import jobstore, keys, wire
from tasks.errors import DeadLettered, Gone, TrifectaError, Unprocessable, translate
from tasks.inputs import IN_REDIS, read_input
from tasks.schemas import InferRequest
from tasks.settings import Settings
from workers.broker import KombuKeys
from workers.device import Device
from workers.events import TaskEvents
from workers.membership import Membership
from workers.metrics import WorkerMetrics
from workers.outputs import Outputs, _now
from workers.resources import gpu_memory_mb, memory_limit_bytes, rss_mb  # noqa: F401 - also read from here
from workers.runners.base import BatchStats, Item, Produced, Runner
from workers.tracing import BatchTrace

log = logging.getLogger("trifecta.worker")
FRESH_S = 0.05  # a START made at receive (workers.broker) stands this long; older, the batch re-reads the status


class WorkerService(Membership, TaskEvents, Outputs):
    """Everything a worker does around the model: bookkeeping, storage, replies."""

    def __init__(self, settings: Settings, model: str, device: Device, worker_id: str, runner: Runner) -> None:
        self.settings, self.model, self.device, self.worker_id, self.runner = settings, model, device, worker_id, runner
        self.r = redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=10, retry_on_timeout=True)
        self.store: BlobStore = open_store(settings.storage_url, settings.s3_endpoint_url)
        self._start = self.r.register_script(jobstore.START_LUA)
        self._finish = self.r.register_script(jobstore.FINISH_LUA)
        self._drain = self.r.register_script(wire.DRAIN_LUA)
        self._unstart = self.r.register_script(jobstore.UNSTART_LUA)
        self.drained_tags: set[str] = set()
        self.kombu_keys = KombuKeys()  # kombu's unacked key names; run_worker reads them from the app's transport options
        self._io = ThreadPoolExecutor(max_workers=8, thread_name_prefix="storage")
        self.processed = 0
        self.failed = 0
        self.batches = 0
        self.in_flight = 0
        self._lock = threading.Lock()
        self.consumer: Any = None  # set on worker_ready; its channel's QoS holds our unacked tags
        self.nodename = ""
        self.stopping = False
        self.leaving = False  # deregistered, taking no more work: the heartbeat keeps only the visibility of held messages
        self.left = threading.Event()
        self.on_leave: list[Any] = []  # called once when leaving starts (the batcher's stop_taking)
        self.metrics = WorkerMetrics(model, str(device), worker_id)  # histograms for /metrics (registration hash, WORKER_METRICS_PORT)
        self.memory_limit = memory_limit_bytes(settings.worker_max_memory_mb)  # for the near-the-limit alert (deploy/prometheus)
        self.reg_fields: dict[str, Any] = {}  # extra registration fields from runners' tasks: name -> () -> str (e.g. video `sessions`)
        # started at receive (workers.broker: START in kombu's unacked-record round trip):
        # job id -> (START state, shared queue length then, monotonic time, kombu delivery tag)
        self.received: dict[str, tuple[Any, int, float, str]] = {}
        self.acked: dict[str, float] = {}  # kombu tag -> when: its unacked records went with the FINISH pipeline
        self.events: Any = None  # Celery event dispatcher for per-request task events (TASK_EVENTS), set once the worker is ready
        self._events_lock = threading.Lock()
        self._events_pending = 0

    # -- hooks into kombu's round trips (workers.broker) ------------------------
    def on_receive(self, pipe: Any, message: Any, delivery_tag: str) -> Any:
        headers = message.headers or {}
        jid = headers.get("id")
        if headers.get("task") != keys.TASK_INFER or not isinstance(jid, str):
            return None
        _queue_script(pipe, self._start, [keys.job(jid)], [jobstore.now(), self.settings.max_deliveries, self.worker_id])
        pipe.llen(keys.shared_queue(self.model))  # kombu's pipeline: its client adds global_keyprefix itself

        def take(res: list[Any]) -> None:
            st, llen = res
            if isinstance(st, Exception):  # the batch starts this job itself
                log.warning("job=%s: start at receive failed (%s)", jid, st)
                return
            with self._lock:
                self.received[jid] = (st, llen if isinstance(llen, int) else 1, time.monotonic(), delivery_tag)

        return take

    def acked_already(self, delivery_tag: str) -> bool:
        with self._lock:
            return self.acked.pop(delivery_tag, None) is not None

    def on_give_back(self, delivery_tags: list[str]) -> None:
        """kombu is about to give these messages back unrun (shutdown): undo their START."""
        tags = set(delivery_tags)
        with self._lock:
            jids = [jid for jid, v in self.received.items() if v[3] in tags]
            for jid in jids:
                del self.received[jid]
        if jids:
            pipe = self.r.pipeline(transaction=False)
            for jid in jids:
                _queue_script(pipe, self._unstart, [keys.job(jid)], [self.worker_id])
            pipe.execute()
            log.info("worker %s gives back %d requests it received but never ran", self.worker_id, len(jids))

    # -- the batch ----------------------------------------------------------
    def handle(self, raw: list[dict[str, Any]], received: list[float] | None = None, headers: list[dict[str, Any]] | None = None) -> bool:
        """Run one batch. False = it could not start (Redis away): the messages are requeued.
        `headers`: the messages' headers, given while tracing is on (their trace context)."""
        t_start = time.time()
        reqs: list[InferRequest] = []
        bt = None if headers is None else BatchTrace(self.model, self.worker_id, str(self.device))
        for i, kw in enumerate(raw):
            try:
                reqs.append(InferRequest.model_validate(kw["req"]))
            except Exception as e:  # a message we cannot even read: drop it, loudly
                log.error("dropping malformed message: %s", e)
                continue
            if bt is not None:
                bt.carry(reqs[-1].id, headers[i])  # type: ignore[index]
        if not reqs:
            return True
        tags: list[str] = []
        n0 = len(reqs)
        with self._lock:
            self.in_flight += n0
        try:
            tags, states, kombu_tags = self._top_up_and_start(reqs, bt)
            with self._lock:
                self.in_flight += len(reqs) - n0
            return self._handle(reqs, t_start, tags, states, kombu_tags, bt)
        except redis.RedisError as e:
            log.warning("batch of %d not started: Redis unreachable (%s); requeued", len(reqs), e)
            return False
        finally:
            with self._lock:
                self.in_flight -= len(reqs)
                self.batches += 1
                self.drained_tags.difference_update(tags)
            self._check_memory()

    def _top_up_and_start(self, reqs: list[InferRequest], bt: BatchTrace | None = None) -> tuple[list[str], list[Any], list[str]]:
        """Fill the batch from the shared queue (BULK_DRAIN: kombu would otherwise fetch, record
        and ack each message with a round trip of its own) and make sure every request is
        started. A request kombu delivered was started at receive (workers.broker); its state
        stands if it is fresh (FRESH_S), else its status is re-read (a cancel meanwhile). The
        drain is skipped when the queue was empty at the latest receive, so a lone request
        costs no round trip here; otherwise ONE round trip, and a second one only for
        requests the drain brought in. Appends the drained requests to `reqs`; returns the
        drained delivery tags, every START state, and the kombu tags to ack with FINISH."""
        now = jobstore.now()
        mono = time.monotonic()
        room = self.settings.max_batch_size - len(reqs)
        states: list[Any] = [None] * len(reqs)
        start_here: list[int] = []
        recheck: list[int] = []
        kombu_tags: list[str] = []
        latest: tuple[float, int] | None = None
        with self._lock:
            for i, q in enumerate(reqs):
                got = self.received.pop(q.id, None)
                if got is None:
                    start_here.append(i)
                    continue
                st, llen, t, tag = got
                states[i] = st
                kombu_tags.append(tag)
                if mono - t > FRESH_S:
                    recheck.append(i)
                if latest is None or t > latest[0]:
                    latest = (t, llen)
        quiet = not start_here and latest is not None and latest[1] == 0 and mono - latest[0] <= FRESH_S
        drain = self.settings.bulk_drain and room > 0 and not quiet
        raws: Any = []
        if drain or start_here or recheck:
            pipe = self.r.pipeline(transaction=False)
            if drain:
                _queue_script(pipe, self._drain, *self.kombu_keys.drain(keys.shared_queue(self.model), room, time.time(), keys.TASK_INFER))
            for i in start_here:
                _queue_script(pipe, self._start, [keys.job(reqs[i].id)], [now, self.settings.max_deliveries, self.worker_id])
            for i in recheck:
                pipe.hget(keys.job(reqs[i].id), "status")
            res = pipe.execute(raise_on_error=False)
            raws = res.pop(0) if drain else []
            for r in res:
                if isinstance(r, Exception) and not isinstance(r, OutOfMemoryError):
                    raise r if isinstance(r, redis.RedisError) else redis.RedisError(str(r))
            for i in start_here:
                states[i] = res.pop(0)
            refused = [i for i in start_here if isinstance(states[i], OutOfMemoryError)]
            if refused:  # at maxmemory: wait for room rather than hand the messages back (that write is refused too)
                for i, st in zip(refused, self._start_all([reqs[i] for i in refused], now), strict=True):
                    states[i] = st
            for i in recheck:
                raw_status = res.pop(0)
                status = orjson.loads(raw_status) if raw_status else "missing"
                if status in keys.TERMINAL or status == "missing":
                    states[i] = [status, states[i][1]]
        if isinstance(raws, Exception):  # the drain failed alone: run the batch as it is
            log.warning("bulk drain failed (%s)", raws)
            raws = []
        tags = []
        added: list[InferRequest] = []
        for m in raws:
            try:
                h, kw = wire.decode_message(m)
                added.append(InferRequest.model_validate(kw["req"]))
                if bt is not None:
                    bt.carry(added[-1].id, h)
            except Exception as e:  # noqa: BLE001 - unreadable: acked below and dropped, loudly
                log.error("dropping malformed message: %s", e)
            tags.append(wire.delivery_tag(m))
        with self._lock:
            self.drained_tags.update(tags)
        if added:
            try:
                states += self._start_all(added, now)
            except redis.RedisError:
                with self._lock:  # not ours to hold any more: kombu's visibility timeout restores them
                    self.drained_tags.difference_update(tags)
                raise
            reqs += added
        return tags, states, kombu_tags

    def _start_all(self, reqs: list[InferRequest], now: float) -> list[Any]:
        """START each request in one pipeline. At Redis's maxmemory a START is refused before it
        writes anything; those are tried again after a pause until there is room (the API refuses
        new work meanwhile): handing the messages back would need a write Redis refuses too."""
        out: list[Any] = [None] * len(reqs)
        todo = list(range(len(reqs)))
        attempt = 0
        while True:
            pipe = self.r.pipeline(transaction=False)
            for i in todo:
                _queue_script(pipe, self._start, [keys.job(reqs[i].id)], [now, self.settings.max_deliveries, self.worker_id])
            again = []
            for i, r in zip(todo, pipe.execute(raise_on_error=False), strict=True):
                if isinstance(r, OutOfMemoryError):
                    again.append(i)
                elif isinstance(r, Exception):
                    raise r if isinstance(r, redis.RedisError) else redis.RedisError(str(r))
                else:
                    out[i] = r
            if not again:
                return out
            if attempt % 20 == 0:
                log.warning("Redis is at its maxmemory: %d request(s) wait to be started (retrying)", len(again))
            time.sleep(min(2.0, 0.1 * (attempt + 1)))
            todo, attempt = again, attempt + 1

    def _handle(self, reqs: list[InferRequest], t_start: float, tags: list[str], states: list[Any], kombu_tags: list[str], bt: BatchTrace | None = None) -> bool:
        now = jobstore.now()
        live: list[InferRequest] = []
        done: list[tuple[InferRequest, str, dict[str, Any]]] = []
        dropped: list[tuple[InferRequest, dict[str, Any]]] = []  # failed before the runner saw them
        for q, (st, n) in zip(reqs, states, strict=True):
            st = st.decode() if isinstance(st, bytes) else st
            if st == "running":
                if q.deadline < now:
                    err = jobstore.error("deadline_exceeded", "the request's deadline passed before a worker reached it; it was dropped unrun", status=504)
                    done.append((q, "failed", err))
                    dropped.append((q, err))
                else:
                    live.append(q)
            elif st == "dead":
                log.error("job=%s model=%s dead-lettered after %s deliveries", q.id, q.model, int(n) - 1)
                self.r.pipeline(transaction=False).lpush(keys.DEADLETTER, orjson.dumps({"id": q.id, "model": q.model, "deliveries": int(n) - 1, "at": now})).ltrim(keys.DEADLETTER, 0, keys.DEADLETTER_KEEP - 1).execute()
                err = _err(DeadLettered(f"delivered {int(n) - 1} times without finishing (the worker died each time); not retried"))
                self._publish_only(q, "failed", {"error": err})
                dropped.append((q, err))
            else:  # finished, cancelled, or record gone: a redelivery costs nothing
                log.info("job=%s skipped (status %s)", q.id, st)
        items: list[Item] = []
        held = self._inputs_in_redis(live)
        for q in live:
            try:
                if q.input.uri == IN_REDIS:
                    items.append(Item(q, _held_input(held, q)))
                    continue
                # the tenant's own check again before reading (the API checked it too): a message
                # put on the queue by anything else still cannot read another tenant's objects
                items.append(Item(q, read_input(q.input, self.store, self.settings, tenant=q.tenant)))
            except Exception as e:
                err = _err(translate(e))
                done.append((q, "failed", err))
                dropped.append((q, err))
        if dropped:  # parts of a bigger job (video clips) are recorded there, or the job would never finish
            try:
                self.runner.dropped(dropped)
            except Exception:  # noqa: BLE001 - the requests' own records still go out below
                log.exception("recording %d dropped requests with their jobs failed", len(dropped))
        stats = BatchStats()
        # remote store: sync masks that ride in the reply are written after it is sent (`_reply_then_store`)
        later: dict[str, list[tuple[str, bytes, str]]] | None = None if isinstance(self.store, FileStore) else {}
        publish = self._publish_outputs if later is None else functools.partial(self._publish_outputs, later=later)
        if bt is None:
            results = self.runner.run_batch(items, stats) if items else []
        else:  # the runner's hooks and the writes timed for the batch's spans (workers/tracing.py)
            with bt.running():
                results = self.runner.run_batch(items, stats) if items else []
            publish = bt.storage(publish)
        # several samples' outputs are encoded and written in parallel; one sample's (or none) needs no thread hop
        parallel = sum(isinstance(res, Produced) and bool(res.masks or res.blobs) for res in results) > 1
        futures = [(it, (self._io.submit if parallel else _now)(publish, it.req, res)) if isinstance(res, Produced) else (it, res) for it, res in zip(items, results, strict=True)]
        model_ms = stats.model_ms + stats.prepare_ms
        for it, fut in futures:
            q = it.req
            if isinstance(fut, TrifectaError):
                done.append((q, "failed", _err(fut)))
                continue
            try:
                outputs, meta = fut.result()
            except Exception as e:
                done.append((q, "failed", _err(translate(e))))
                continue
            result = {
                "outputs": [o.model_dump() for o in outputs],
                "meta": meta,
                "timing": {"queue_ms": round((t_start - q.created) * 1000, 2), "model_ms": round(model_ms, 2), "batch_size": len(items)},
                "worker": self.worker_id,
                "device": str(self.device),
                "trained": self.runner.trained,  # false: a random-init model answered (X-Model-Untrained on sync answers)
            }
            if q.write_result_json:
                self.store.put(f"{q.out_prefix}/result.json", orjson.dumps({"job_id": q.id, "model": q.model, **result}), "application/json")
            done.append((q, "succeeded", result))
        replied: set[str] = set()
        if later:
            done, replied = self._reply_then_store(done, later)
        self._finish_all(done, tags, kombu_tags, [keys.sync_input(i) for i in held], replied)
        self.metrics.observe(done, t_start, model_ms, len(items))
        self._task_events(done, t_start)
        if bt is not None:
            try:
                bt.emit(done, t_start, len(items))
            except Exception:  # noqa: BLE001 - tracing never fails a batch
                log.exception("recording the spans of a batch failed")
        for q, status, _body in done:
            queue_ms = (t_start - q.created) * 1000
            extra = {"job_id": q.id, "tenant": q.tenant, "kind": q.kind, "status": status, "queue_ms": round(queue_ms, 2), "model_ms": round(model_ms, 2), "batch_size": len(items)}
            if bt is not None and (tid := bt.log_trace_id(q.id)):
                extra["trace_id"] = tid
            log.info("job=%s model=%s device=%s status=%s queue_ms=%.1f model_ms=%.1f batch=%d", q.id, q.model, self.device, status, queue_ms, model_ms, len(items), extra=extra)
        return True

    def _inputs_in_redis(self, live: list[InferRequest]) -> dict[str, bytes | None]:
        """Sync inputs the API held in Redis (SYNC_REDIS_INPUT_MAX_BYTES), in one round trip for the
        batch; job id -> bytes (None: expired). Deleted with the batch's FINISH (`_record`)."""
        ids = [q.id for q in live if q.input.uri == IN_REDIS]
        return dict(zip(ids, self.r.mget([keys.sync_input(i) for i in ids]), strict=True)) if ids else {}

    def _finish_all(self, done: list[tuple[InferRequest, str, dict[str, Any]]], tags: list[str], kombu_tags: list[str], drop: list[str] | None = None, replied: set[str] | None = None) -> None:
        acks = [*tags, *kombu_tags]
        if not done and not acks:
            return
        now = jobstore.now()
        sync_ttl = self.settings.sync_result_ttl_s
        calls: list[tuple[list[str], list[Any]]] = []
        index: dict[str, float] = {}  # storage prefixes of answered sync requests: the janitor deletes them with the record
        for q, status, body in done:
            field = "result" if status == "succeeded" else "error"
            record, inline, stored = _record_body(body)
            channel = "" if replied and q.id in replied else (q.reply or "")
            reply = jobstore.reply_payload(q.id, status, {field: body}) if channel else b""
            calls.append(([keys.job(q.id)], [status, now, field, orjson.dumps(record), channel, reply, sync_ttl if q.kind == "sync" else "", "1" if inline else ""]))
            if q.kind == "sync" and stored:
                index[q.out_prefix] = now + sync_ttl + 1
        res = self._record(calls, index, acks, drop or [])
        # the API detached (504) requests whose outputs were meant to ride in the reply only
        # (STORE_SYNC_RESULTS=false): they are jobs now, so store their outputs and finish them
        late = [(q, status, body) for (q, status, body), r in zip(done, res[: len(calls)], strict=True) if r == -1]
        if late:
            again = []
            for q, status, body in late:
                for o in body.get("outputs", []):
                    if o.get("inline"):
                        self.store.put(o["path"], base64.b64decode(o["data"]), o.get("content_type") or "application/octet-stream")
                        o["inline"], o["data"] = False, None
                record, _, _ = _record_body(body)
                again.append(([keys.job(q.id)], [status, now, "result", orjson.dumps(record), "", "", "", ""]))
                index[q.out_prefix] = now + sync_ttl + 1
            self._record(again, index, [])
        with self._lock:
            self.acked.update(dict.fromkeys(kombu_tags, time.monotonic()))
            for _, status, _ in done:
                if status == "succeeded":
                    self.processed += 1
                else:
                    self.failed += 1

    def _record(self, calls: list[tuple[list[str], list[Any]]], index: dict[str, float], acks: list[str], drop: list[str] | None = None) -> list[Any]:
        """FINISH every call, index the stored prefixes, ack the batch's messages (as kombu's
        QoS.ack would; kombu's own ack then skips Redis) and delete `drop` (inputs held in Redis,
        read and answered) in ONE transaction: at maxmemory Redis
        refuses it whole (FINISH_LUA's shebang), so a result is never acked unrecorded. The work
        is done and its outputs are stored: keep trying through a Redis restart, and for as long
        as Redis is full (the API refuses new work meanwhile; the heartbeat keeps these messages
        ours). Returns the transaction's results (FINISH's first)."""
        attempt = 0
        while True:
            pipe = self.r.pipeline(transaction=True)  # built anew each try: a failed execute() empties a pipeline
            for ks, args in calls:
                _queue_script(pipe, self._finish, ks, args)
            if index:
                pipe.zadd(keys.EXPIRY, index)
            if acks:
                pipe.zrem(self.kombu_keys.unacked_index, *acks)
                pipe.hdel(self.kombu_keys.unacked, *acks)
            if drop:
                pipe.delete(*drop)
            try:
                return pipe.execute()
            except OutOfMemoryError:
                if attempt % 20 == 0:
                    log.warning("Redis is at its maxmemory: %d result(s) wait to be recorded (retrying)", len(calls))
                time.sleep(min(2.0, 0.1 * (attempt + 1)))
            except (redis.ConnectionError, redis.TimeoutError) as e:
                if attempt >= len(_RECORD_RETRY_S):
                    raise redis.ConnectionError(f"could not record results after retries: {e}") from e
                log.warning("recording %d results failed (%s); retrying", len(calls), e)
                time.sleep(_RECORD_RETRY_S[attempt])
            attempt += 1

    def _publish_only(self, q: InferRequest, status: str, body: dict[str, Any]) -> None:
        if q.reply:
            self.r.publish(q.reply, jobstore.reply_payload(q.id, status, body))


_RECORD_RETRY_S = (0.25, 0.5, 1, 2, 2, 4, 4, 8)  # through a Redis restart


def _record_body(body: dict[str, Any]) -> tuple[dict[str, Any], bool, bool]:
    """The body as the job record keeps it (bytes carried in the reply left out), whether some output
    is inline only, and whether some output is in storage."""
    outs = body.get("outputs")
    if not outs:
        return body, False, False
    inline = any(o.get("inline") for o in outs)
    stored = any(not o.get("inline") for o in outs)
    if not any(o.get("data") is not None for o in outs):
        return body, inline, stored
    return {**body, "outputs": [{k: v for k, v in o.items() if k != "data"} for o in outs]}, inline, stored


def _held_input(held: dict[str, bytes | None], q: InferRequest) -> bytes:
    data = held.get(q.id)
    if data is None:  # its TTL (the deadline) passed, or a finished delivery deleted it
        raise Gone("the request's input is no longer held in Redis (it expires with the request's deadline); send the request again")
    if len(data) != q.input.size:
        raise Unprocessable(f"the input held in Redis has {len(data)} bytes, not the {q.input.size} the request declared")
    return data


def _err(e: TrifectaError) -> dict[str, Any]:
    return jobstore.error(e)


def _queue_script(pipe: Any, script: Any, keys_: list[str], args: list[Any]) -> None:
    """A Lua script in a pipeline as EVAL: redis-py sends SCRIPT EXISTS before every pipeline
    holding EVALSHA scripts, one more round trip per batch on the hot path (twice per batch:
    start and finish); EVAL needs none and survives a Redis restart that emptied the script
    cache. Redis hashes the ~1 KB body and reuses its compiled script."""
    pipe.eval(script.script, len(keys_), *keys_, *args)
