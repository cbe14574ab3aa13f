"""The API's only link to the workers: enqueue by name, wait asynchronously, know who is alive.

- Submitting is one Redis transaction (MULTI/EXEC, one round trip): the job record, its
  lifetime (a job: TTL, tombstone, expiry index, the tenant's job list; a sync request: no
  tombstone, its record is shortened to SYNC_RESULT_TTL_S when it finishes in time) and the
  Celery message (built by `tasks.wire`). At Redis's maxmemory all of it is refused: 503
  `redis_full`, nothing half-written.
- Waiting holds no thread: one shared pub/sub subscription per API process feeds a dict
  of futures keyed by job id. If the subscription drops (Redis restart), waiters are
  re-checked against their job records when it comes back, so none hangs past its deadline.
- Admission (503) is decided from memory: a poller refreshes queue depths (a model's shared
  queue plus its live workers' private queues, each private queue also on its own) and live
  workers every POLL_S, and Redis's used memory every MEMORY_POLL_S (503 `redis_full` past
  REDIS_MEMORY_ADMIT_RATIO of its maxmemory); between polls every local enqueue counts at once.
- A worker that left (deregistered on SIGTERM, or its registration expired: killed, host
  lost) leaves its private queue behind: the poller watches that queue for a while (past
  the visibility timeout, when kombu may still restore a dead worker's messages into it)
  and hands over whatever lands there (`tasks.handoff`: moved to the shared queue, session
  calls answered 410).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tasks import handoff, jobstore, keys, queuekeys
from tasks.errors import BrokerUnavailable, NoWorker, Overloaded, SyncTimeout, TrifectaError, is_redis_oom, redis_full
from tasks.models import MODEL_NAMES
from tasks.schemas import InferRequest
from tasks.settings import Settings
from tasks.wire import build_message

log = logging.getLogger("trifecta.api")
POLL_S = 0.1
MEMORY_POLL_S = 1.0  # INFO memory: cheap, but no need to ask it ten times a second
INPUT_TTL_MARGIN_S = 5.0  # a sync input held in Redis outlives its request's deadline by this (clock skew between hosts)


@dataclass
class WorkerInfo:
    id: str
    model: str
    device: str
    queues: list[str]
    info: dict[str, Any]
    heartbeat: float
    in_flight: int = 0
    processed: int = 0
    failed: int = 0
    rss_mb: float = 0.0
    gpu_memory_mb: float = 0.0
    raw: dict[str, str] = field(default_factory=dict)


class Hub:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.id = uuid.uuid4().hex[:12]
        self.channel = keys.reply_channel(self.id)
        self.qkeys = queuekeys.for_settings(settings)  # queue name -> Redis key (kombu's global_keyprefix)
        # a bounded pool that makes a burst wait its turn for a connection (a few ms) rather than
        # fail with "too many connections": 1,000 waiting requests share these, none holds one while it waits
        pool = aioredis.BlockingConnectionPool.from_url(settings.redis_url, max_connections=64, timeout=5, socket_timeout=5, socket_connect_timeout=2, health_check_interval=10)
        self.redis = aioredis.Redis(connection_pool=pool)
        self.waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.depth: dict[str, int] = {m: 0 for m in MODEL_NAMES}  # shared queue + live workers' private queues
        self.private_depth: dict[str, int] = {}  # a live worker's private queue -> its length
        self.workers: dict[str, list[WorkerInfo]] = {m: [] for m in MODEL_NAMES}
        self.redis_ok = False
        self.subscribed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.jobs = jobstore.AsyncJobs(self.redis)  # the job store's async face
        self.memory: dict[str, Any] = {"used": 0, "max": 0, "policy": "", "at": 0.0}  # Redis's INFO memory, every MEMORY_POLL_S
        self.counters: dict[str, int] = {"rejected_503": 0, "timeouts_504": 0}
        self.orphans: dict[str, tuple[str, str, float]] = {}  # private queue of a worker that left -> (model, worker id, watched until)
        self._handing: dict[str, asyncio.Task[None]] = {}
        self._sync_redis: redis.Redis | None = None  # for tasks.handoff, in a thread (rare: a worker left)

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._listen(), name="reply-listener"), asyncio.create_task(self._poll(), name="state-poller")]
        try:
            await asyncio.wait_for(self.subscribed.wait(), 2)
            await self.refresh()
            await self.refresh_memory()
        except (TimeoutError, RedisError, OSError):
            log.warning("Redis at %s is not answering yet; the API answers 503 until it does", self.settings.redis_url)

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._handing.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.redis.aclose()

    async def _listen(self) -> None:
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.subscribed.set()
                await self._recheck_waiters()  # replies published while we were not listening
                while True:
                    msg = await pubsub.get_message(timeout=5.0)
                    if msg is None:
                        continue
                    data = orjson.loads(msg["data"])
                    fut = self.waiters.get(data.get("id", ""))
                    if fut is not None and not fut.done():
                        fut.set_result(data)
            except asyncio.CancelledError:
                await _quiet(pubsub.aclose())
                raise
            except (RedisError, OSError) as e:
                self.subscribed.clear()
                self.redis_ok = False
                log.warning("reply subscription lost (%s); resubscribing", e)
                await _quiet(pubsub.aclose())
                await asyncio.sleep(0.25)

    async def _recheck_waiters(self) -> None:
        ids = [i for i, f in self.waiters.items() if not f.done()]
        if not ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        for i in ids:
            pipe.hmget(keys.job(i), ["status", "result", "error"])
        for i, (st, res, err) in zip(ids, await pipe.execute(), strict=True):
            status = orjson.loads(st) if st else None
            if status in keys.TERMINAL:
                fut = self.waiters.get(i)
                if fut and not fut.done():
                    fut.set_result({"id": i, "status": status, "result": orjson.loads(res) if res else None, "error": orjson.loads(err) if err else None})

    async def _poll(self) -> None:
        while True:
            try:
                await self.refresh()
                if time.monotonic() - self.memory["at"] >= MEMORY_POLL_S:
                    await self.refresh_memory()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as e:
                if self.redis_ok:
                    log.warning("Redis unreachable (%s)", e)
                self.redis_ok = False
            await asyncio.sleep(POLL_S)

    async def refresh(self) -> None:
        """Queue depths and live workers in two round trips, whatever the number of workers.

        A model's depth is its shared queue plus the private queues of its live workers (SAM3
        image affinity, video sessions), read in the first pipeline with the shared ones; each
        private queue's length is kept too (`private_depth`). A private queue's name comes with
        its worker's registration, so the poll that first sees a worker reads its queue in one
        more small pipeline (once per worker, not per poll).
        """
        known = sorted(self.private_depth)
        orphans = sorted(self.orphans)
        pipe = self.redis.pipeline(transaction=False)
        for m in MODEL_NAMES:
            pipe.llen(self.qkeys.queue(keys.shared_queue(m)))
        for q in known + orphans:
            pipe.llen(self.qkeys.queue(q))
        pipe.smembers(keys.WORKERS)
        res = await pipe.execute()
        depths, ids = res[: len(MODEL_NAMES)], sorted(x.decode() for x in res[-1])
        lens = [int(x) for x in res[len(MODEL_NAMES) : -1]]
        lengths = dict(zip(known, lens[: len(known)], strict=True))
        waiting = dict(zip(orphans, lens[len(known) :], strict=True))
        pipe = self.redis.pipeline(transaction=False)
        for wid in ids:
            pipe.hgetall(keys.worker(wid))
        infos = await pipe.execute() if ids else []
        workers: dict[str, list[WorkerInfo]] = {m: [] for m in MODEL_NAMES}
        gone = []
        for wid, raw in zip(ids, infos, strict=True):
            if not raw:
                gone.append(wid)
                continue
            d = {k.decode(): v.decode() for k, v in raw.items()}
            w = WorkerInfo(
                id=d["id"], model=d["model"], device=d.get("device", "cpu"), queues=d.get("queues", "").split(","),
                info=orjson.loads(d.get("info", "{}")), heartbeat=float(d.get("heartbeat", 0)), in_flight=int(d.get("in_flight", 0)),
                processed=int(d.get("processed", 0)), failed=int(d.get("failed", 0)), rss_mb=float(d.get("rss_mb", 0)),
                gpu_memory_mb=float(d.get("gpu_memory_mb", 0)), raw=d,
            )
            workers.setdefault(w.model, []).append(w)
        private = {w.queues[1]: w.model for ws in workers.values() for w in ws if len(w.queues) > 1 and w.queues[1]}
        new = [q for q in private if q not in lengths]
        if new:
            pipe = self.redis.pipeline(transaction=False)
            for q in new:
                pipe.llen(self.qkeys.queue(q))
            lengths.update(zip(new, (int(x) for x in await pipe.execute()), strict=True))
        if gone:
            await self.redis.srem(keys.WORKERS, *gone)
        self._watch_left(private, gone, waiting)
        depth = dict(zip(MODEL_NAMES, (int(x) for x in depths), strict=True))
        for q, m in private.items():  # a dead worker's private queue is nobody's backlog: not counted
            depth[m] = depth.get(m, 0) + lengths[q]
        self.depth = depth
        self.private_depth = {q: lengths[q] for q in private}
        self.workers = workers
        self.redis_ok = True

    async def refresh_memory(self) -> None:
        """Redis's used memory against its maxmemory (0 = no limit), for admission, /health and /metrics."""
        info = await self.redis.info("memory")
        policy = str(info.get("maxmemory_policy", ""))
        if info.get("maxmemory") and policy != "noeviction" and policy != self.memory["policy"]:
            log.warning("Redis evicts keys at maxmemory (maxmemory-policy %s): queued work and job records can be lost; set noeviction", policy)
        self.memory = {"used": int(info.get("used_memory", 0)), "max": int(info.get("maxmemory", 0) or 0), "policy": policy, "at": time.monotonic()}

    def memory_ratio(self) -> float:
        """Used memory / maxmemory (0 without a limit)."""
        return self.memory["used"] / self.memory["max"] if self.memory["max"] else 0.0

    def redis_failed(self, e: Exception) -> TrifectaError:
        """The 503 for a failed write: Redis full (it answered, refusing) or unreachable."""
        if is_redis_oom(e):
            self.memory["used"] = max(self.memory["used"], self.memory["max"])  # refuse at once, not at the next poll
            return redis_full("it refused a write at its maxmemory")
        self.redis_ok = False
        return BrokerUnavailable(f"the queue (Redis) is unreachable: {e}", headers={"Retry-After": "2"})
    def _watch_left(self, private: dict[str, str], gone: list[str], waiting: dict[str, int]) -> None:
        """Private queues of workers that left (since the last poll, or found expired) are watched
        for `2 × VISIBILITY_TIMEOUT_S + 10` s; whatever waits on one is handed over."""
        now = time.monotonic()
        until = now + 2 * self.settings.visibility_timeout_s + 10
        for ws in self.workers.values():  # the previous poll's workers
            for w in ws:
                if len(w.queues) > 1 and w.queues[1] and w.queues[1] not in private:
                    self.orphans[w.queues[1]] = (w.model, w.id, until)
        for wid in gone:  # expired before this process ever saw it: its model is unknown, try each
            for m in MODEL_NAMES:
                self.orphans.setdefault(keys.private_queue(m, wid), (m, wid, until))
        for q, (m, wid, t) in list(self.orphans.items()):
            if q in private or t < now:  # a worker of that name is back (it consumes its queue again), or watched long enough
                del self.orphans[q]
            elif waiting.get(q) and q not in self._handing:
                self._handing[q] = asyncio.create_task(self._hand_over(q, m, wid))

    async def _hand_over(self, queue: str, model: str, worker_id: str) -> None:
        try:
            if self._sync_redis is None:
                self._sync_redis = redis.Redis.from_url(self.settings.redis_url, socket_timeout=5, socket_connect_timeout=2)
            await asyncio.to_thread(handoff.hand_over, self._sync_redis, model, worker_id, self.qkeys)
        except (RedisError, OSError) as e:
            log.warning("handing over %s failed (%s); retried at the next poll", queue, e)
        finally:
            self._handing.pop(queue, None)

    # -- admission (no I/O) ----------------------------------------------------
    def live(self, model: str) -> list[WorkerInfo]:
        return self.workers.get(model, [])

    def admit(self, model: str, n: int = 1, queue: str | None = None) -> None:
        """Raise 503 now, or reserve n places in the model's queue (and in `queue`, a worker's private one)."""
        self.check(model, n, queue)
        # reserve the places now, before any await, so a burst cannot all pass at once;
        # the poller replaces the estimate with the real queue length every POLL_S
        self.depth[model] = self.depth.get(model, 0) + n
        if queue is not None and queue in self.private_depth:
            self.private_depth[queue] += n

    def check_broker(self) -> None:
        """503 while the poller cannot reach Redis."""
        if not self.redis_ok:
            raise BrokerUnavailable("the queue (Redis) is unreachable; retry shortly", headers={"Retry-After": "2"})
        ratio = self.memory_ratio()
        if ratio >= self.settings.redis_memory_admit_ratio and ratio > 0:
            raise redis_full(f"{self.memory['used'] / 1e6:.1f} of its {self.memory['max'] / 1e6:.1f} MB maxmemory used, REDIS_MEMORY_ADMIT_RATIO={self.settings.redis_memory_admit_ratio:g}")

    def check(self, model: str, n: int = 1, queue: str | None = None) -> None:
        """The 503 decision alone, from memory: Redis reachable, a live worker, room in the queue.

        Room: the model's depth (shared queue + its live workers' private queues) plus `n` stays
        within MAX_QUEUE_DEPTH; a call to one worker's private `queue` must also fit that queue's
        share, ceil(MAX_QUEUE_DEPTH / live workers): one worker drains it alone, so a backlog of
        that share waits about as long as a full shared queue drained by all. One hot worker
        gets 503 while the others still take work. `n=0` asks only for Redis and a live worker
        (shard jobs, which have a queue of their own; a tar before its samples are counted).
        """
        self.check_broker()
        workers = self.workers.get(model)
        if not workers and not self.settings.queue_without_workers:
            raise NoWorker(f"no live worker serves {model!r}; start one with `trifecta worker --model {model}`", headers={"Retry-After": "5"})
        if n <= 0:
            return
        limit = self.settings.max_queue_depth
        waiting = self.depth.get(model, 0)
        if waiting + n > limit:
            self.counters["rejected_503"] += 1
            raise Overloaded(f"the {model!r} queue is full ({waiting} waiting, MAX_QUEUE_DEPTH={limit}); retry after a moment", headers={"Retry-After": "1"})
        if queue is not None and queue in self.private_depth and workers:
            share = -(-limit // len(workers))
            mine = self.private_depth[queue]
            if mine + n > share:
                self.counters["rejected_503"] += 1
                raise Overloaded(
                    f"worker queue {queue!r} is full ({mine} waiting; its share of MAX_QUEUE_DEPTH={limit} over {len(workers)} workers is {share}); retry after a moment",
                    headers={"Retry-After": "1"},
                )

    # -- submit and wait -------------------------------------------------------
    def new_request(self, model: str, *, tenant: str, kind: str, params: dict[str, Any], fmt: str, timeout_s: float, inp: dict[str, Any], job_id: str | None = None, write_result_json: bool = False, reply: bool = False) -> InferRequest:
        job_id = job_id or new_job_id()
        now = time.time()
        deadline = now + timeout_s + (self.settings.sync_grace_s if kind == "sync" else 0)
        return InferRequest.model_validate(
            {
                "id": job_id, "model": model, "input": inp, "params": params, "format": fmt, "deadline": deadline,
                "reply": self.channel if reply else None, "tenant": tenant, "kind": kind,
                "out_prefix": f"{tenant}/jobs/{job_id}", "created": now, "write_result_json": write_result_json,
            }
        )

    async def submit(self, reqs: list[InferRequest], *, docs: list[dict[str, Any]] | None = None, queue: str | None = None, idem_key: str | None = None, inputs: dict[str, bytes] | None = None) -> None:
        """Write the job records and enqueue the messages, in one round trip (all or nothing).

        A job gets its full lifetime (`jobstore.keep`). A sync request's record gets
        RESULT_TTL_SECONDS for now and no tombstone: FINISH shortens it to SYNC_RESULT_TTL_S
        when answered in time, a 504 detaches it into a job (`run_sync`). `inputs`: sync
        requests' input bytes held in Redis (job id -> bytes, SYNC_REDIS_INPUT_MAX_BYTES), each
        under `keys.sync_input` expiring a few seconds after its request's deadline (no worker
        runs it later); the worker deletes it once it has answered."""
        s = self.settings
        ttl = s.result_ttl_seconds
        pipe = self.redis.pipeline(transaction=True)
        added = 0
        for i, q in enumerate(reqs):
            doc = docs[i] if docs else {"id": q.id, "model": q.model, "kind": q.kind, "tenant": q.tenant, "created_at": q.created, "params": q.params}
            jobstore.create(pipe, doc, ttl=ttl, lifetime="job" if q.kind == "job" else "sync")
            if q.kind != "job":
                if q.input.uri and q.input.uri.startswith("key:"):  # a staged input: the janitor's, should the API die before deleting it
                    pipe.zadd(keys.EXPIRY, {q.out_prefix: q.created + s.sync_result_ttl_s})
            data = inputs.get(q.id) if inputs else None
            if data is not None:
                pipe.set(keys.sync_input(q.id), data, px=max(1000, int((q.deadline - time.time() + INPUT_TTL_MARGIN_S) * 1000)))
                added += len(data) + 100
            msg = build_message(keys.TASK_INFER, q.id, {"req": q.model_dump(exclude_none=True)}, queue or keys.shared_queue(q.model))
            added += len(msg) + 600  # the message and about what its record takes
            pipe.lpush(self.qkeys.queue(queue or keys.shared_queue(q.model)), msg)
        try:
            await pipe.execute()
        except (RedisError, OSError) as e:
            raise self.redis_failed(e) from None
        if self.memory["max"]:  # counted until the next INFO poll, so a burst cannot run far past REDIS_MEMORY_ADMIT_RATIO
            self.memory["used"] += added
        for q in reqs:  # a job's first state change; a sync request's at DEBUG (the worker logs each one it answers)
            level = logging.INFO if q.kind == "job" else logging.DEBUG
            if log.isEnabledFor(level):
                log.log(level, "job=%s model=%s tenant=%s kind=%s status=queued", q.id, q.model, q.tenant, q.kind, extra={"job_id": q.id, "model": q.model, "tenant": q.tenant, "kind": q.kind, "status": "queued"})

    async def run_sync(self, reqs: list[InferRequest], timeout_s: float, queue: str | None = None, inputs: dict[str, bytes] | None = None) -> list[dict[str, Any]]:
        """Submit (to `queue`, default the model's shared queue; `inputs` as `submit` takes them)
        and wait for every request; 504 (with the job ids) past the timeout."""
        loop = asyncio.get_running_loop()
        futs = []
        for q in reqs:
            f: asyncio.Future[dict[str, Any]] = loop.create_future()
            self.waiters[q.id] = f
            futs.append(f)
        try:
            await self.submit(reqs, queue=queue, inputs=inputs)
            done, pending = await asyncio.wait(futs, timeout=timeout_s)
            if pending:
                ids = [q.id for q in reqs]
                if not self.redis_ok:  # the deadline passed while Redis was away: say so, don't blame the model
                    raise BrokerUnavailable(
                        f"the queue (Redis) became unreachable while this request waited; poll /v1/jobs/{ids[0]} once it is back",
                        headers={"Retry-After": "2"}, extra={"job_id": ids[0], "status_url": f"/v1/jobs/{ids[0]}"},
                    )
                if not await self._detach(reqs, futs):  # every one finished as we gave up: answer them
                    return await self._late_replies(reqs, futs)
                self.counters["timeouts_504"] += 1
                raise SyncTimeout(
                    f"no result within {timeout_s:g} s; the work goes on — poll its status URL",
                    extra={"job_id": ids[0], "status_url": f"/v1/jobs/{ids[0]}", **({"job_ids": ids} if len(ids) > 1 else {})},
                )
            return [f.result() for f in futs]
        finally:
            for q in reqs:
                self.waiters.pop(q.id, None)

    async def _detach(self, reqs: list[InferRequest], futs: list[asyncio.Future[dict[str, Any]]]) -> bool:
        """The wait ran out: turn the call's requests into jobs (RESULT_TTL_SECONDS, tombstone)
        before answering 504. DETACH_LUA and the worker's FINISH_LUA decide on the same record,
        so a request finishing right now lands with one lifetime or the other, never neither.
        False when every unanswered request turned out finished: the caller answers instead."""
        s = self.settings
        pending = [q for q, f in zip(reqs, futs, strict=True) if not f.done()]
        try:
            states = await self._detach_all(pending, force=False)
            if all(st in keys.TERMINAL for st in states):
                return False
            rest = [q for q, f in zip(reqs, futs, strict=True) if f.done()] + [q for q, st in zip(pending, states, strict=True) if st in keys.TERMINAL]
            if rest:  # the call's other requests (a tar's samples) are polled as jobs too
                await self._detach_all(rest, force=True)
        except (RedisError, OSError) as e:  # at worst the record keeps the sync lifetime: it can still be polled for SYNC_RESULT_TTL_S
            log.warning("could not mark %d timed-out sync request(s) as jobs (%s); they keep SYNC_RESULT_TTL_S=%d", len(pending), e, s.sync_result_ttl_s)
        return True

    async def _detach_all(self, reqs: list[InferRequest], force: bool) -> list[str]:
        ttl = self.settings.result_ttl_seconds
        pipe = self.redis.pipeline(transaction=False)
        for q in reqs:
            jobstore.queue(pipe, jobstore.detach_call(q.id, q.tenant, ttl, force))
        return [r.decode() if isinstance(r, bytes) else str(r) for r in await pipe.execute()]

    async def _late_replies(self, reqs: list[InferRequest], futs: list[asyncio.Future[dict[str, Any]]]) -> list[dict[str, Any]]:
        """Replies of requests found finished just after the wait ran out: published already, so the
        subscription brings them at once; their records stand in should it not (outputs sent inline
        only are then missing: sync.output_bytes answers 503)."""
        await asyncio.wait(futs, timeout=1.0)
        missing = [q.id for q, f in zip(reqs, futs, strict=True) if not f.done()]
        if missing:
            pipe = self.redis.pipeline(transaction=False)
            for i in missing:
                pipe.hmget(keys.job(i), ["status", "result", "error"])
            for i, (st, res, err) in zip(missing, await pipe.execute(), strict=True):
                fut = self.waiters.get(i)
                if fut is not None and not fut.done():
                    gone = jobstore.error("internal", "the request's record vanished before its reply was read; retry")
                    fut.set_result({"id": i, "status": orjson.loads(st) if st else "failed", "result": orjson.loads(res) if res else None, "error": orjson.loads(err) if err else (None if st else gone)})
        return [f.result() for f in futs]

    # -- job records -------------------------------------------------------------
    async def get_job(self, job_id: str) -> dict[str, Any] | None:
        return await self.jobs.get(job_id)

    async def tombstone(self, job_id: str) -> str | None:
        return await self.jobs.tombstone(job_id)

    async def cancel(self, job_id: str) -> str:
        st = await self.jobs.cancel(job_id)
        log.info("job=%s cancel asked: status=%s", job_id, st, extra={"job_id": job_id, "status": st})
        return st


def new_job_id() -> str:
    """Unguessable: 128 random bits."""
    return uuid.uuid4().hex


async def _quiet(aw: Any) -> None:
    try:
        await aw
    except (TrifectaError, RedisError, OSError, RuntimeError):
        pass
