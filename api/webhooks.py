"""The webhook sender: one asyncio task per API process that POSTs finished jobs' status JSON.

Finished jobs with a `callback_url` are LPUSHed to `tf:webhooks:queue` by the job's
finishing Lua script (tasks/jobstore/lua.py: NOTIFY). The sender claims one id at a time with a Lua
script that moves it into the `tf:webhooks:schedule` ZSET with a lease (score = now +
lease): if this process dies mid-delivery the id comes due again and any API process
retries it, so deliveries and their retries survive an API restart. A failed delivery is
re-scheduled with exponential backoff (WEBHOOK_BACKOFF_S, doubling, ±20 % jitter) until
WEBHOOK_MAX_ATTEMPTS; a 2xx answer ends it. Receivers must therefore accept the same job
more than once (the `X-Trifecta-Delivery` header names the attempt).

The body is what `GET /v1/jobs/{id}` answers at send time, signed as tasks/webhooks.py
describes. The target is checked against WEBHOOK_ALLOWED_HOSTS again right before each
send (the list may have changed since submit) and redirects are never followed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
import orjson
import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.exceptions import RedisError

from api.metrics import REGISTRY
from storage.blob import open_store
from tasks import jobstore, keys
from tasks import webhooks as wh
from tasks.settings import Settings

log = logging.getLogger("trifecta.webhooks")

DELIVERIES = Counter("trifecta_webhook_deliveries", "Webhook POST attempts by outcome (delivered, retry, gave_up, refused).", ["outcome"], registry=REGISTRY)
IDLE_S = 0.2
CONCURRENCY = 16

# KEYS[1]=schedule KEYS[2]=queue ARGV[1]=now ARGV[2]=lease until → a job id or false
CLAIM_LUA = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)
if due[1] then
  redis.call('ZADD', KEYS[1], ARGV[2], due[1])
  return due[1]
end
local id = redis.call('RPOP', KEYS[2])
if id then
  redis.call('ZADD', KEYS[1], ARGV[2], id)
  return id
end
return false
"""


class WebhookSender:
    def __init__(self, settings: Settings, redis: aioredis.Redis, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self.redis = redis
        self._claim = redis.register_script(CLAIM_LUA)
        self._http = httpx.AsyncClient(timeout=settings.webhook_timeout_s, follow_redirects=False, transport=transport, headers={"User-Agent": "trifecta-webhook/1"})
        self._task: asyncio.Task[None] | None = None
        self._sem = asyncio.Semaphore(CONCURRENCY)
        self._inflight: set[asyncio.Task[None]] = set()
        self._claimed: set[str] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="webhook-sender")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        tasks = [t for t in (self._task, *self._inflight) if t]
        for t in self._inflight:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._claimed:  # a graceful stop hands interrupted deliveries back at once, not after their lease
            try:
                await self.redis.zadd(keys.WEBHOOK_SCHEDULE, {j: time.time() for j in self._claimed}, xx=True)
            except (RedisError, OSError):
                pass
        await self._http.aclose()

    def lease_s(self) -> float:
        return self.settings.webhook_timeout_s + 30

    async def _run(self) -> None:
        while True:
            try:
                await self._sem.acquire()
                try:
                    got = await self._claim(keys=[keys.WEBHOOK_SCHEDULE, keys.WEBHOOK_QUEUE], args=[time.time(), time.time() + self.lease_s()])
                except BaseException:
                    self._sem.release()
                    raise
                if not got:
                    self._sem.release()
                    await asyncio.sleep(IDLE_S)
                    continue
                job_id = got.decode() if isinstance(got, bytes) else str(got)
                self._claimed.add(job_id)
                t = asyncio.create_task(self._deliver_released(job_id))
                self._inflight.add(t)
                t.add_done_callback(self._inflight.discard)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as e:
                log.warning("webhook sender: Redis unreachable (%s); retrying", e)
                await asyncio.sleep(1.0)

    async def _deliver_released(self, job_id: str) -> None:
        try:
            await self.deliver(job_id)
            self._claimed.discard(job_id)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - one bad delivery must not stop the sender; its lease brings it back
            self._claimed.discard(job_id)
            log.exception("webhook for job=%s failed unexpectedly; it will be retried", job_id)
        finally:
            self._sem.release()

    async def deliver(self, job_id: str) -> str:
        """One attempt for `job_id` (already claimed): 'delivered', 'retry', 'gave_up' or 'refused'."""
        s = self.settings
        raw = await self.redis.hgetall(keys.job(job_id))
        if not raw:
            await self._give_up(job_id, "the job record expired before its webhook was delivered")
            return "gave_up"
        rec = jobstore.parse_record(raw)
        url = rec.get("callback_url")
        if not url:
            await self.redis.zrem(keys.WEBHOOK_SCHEDULE, job_id)
            return "gave_up"
        if not s.webhook_secret:
            return await self._refuse(job_id, "WEBHOOK_SECRET is not set on the API; webhooks are not sent unsigned")
        try:
            await asyncio.to_thread(wh.check_target, url, s.webhook_allowed_hosts)
        except ValueError as e:
            return await self._refuse(job_id, str(e))
        from api.routes.jobs import render  # the same body GET /v1/jobs/{id} answers

        body = orjson.dumps(render(rec, open_store(s.storage_url, s.s3_endpoint_url), s))
        attempt = int(await self.redis.hincrby(keys.webhook(job_id), "attempts", 1))
        await self.redis.expire(keys.webhook(job_id), s.result_ttl_seconds)
        headers = {
            "Content-Type": "application/json",
            wh.SIGNATURE_HEADER: wh.signature_header(s.webhook_secret, body),
            "X-Trifecta-Event": f"job.{rec['status']}",
            "X-Trifecta-Job-Id": job_id,
            "X-Trifecta-Delivery": f"{job_id}.{attempt}",
        }
        t0 = time.perf_counter()
        try:
            r = await self._http.post(url, content=body, headers=headers)
            ok, why = 200 <= r.status_code < 300, f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            ok, why = False, f"{type(e).__name__}: {e}"
        ms = (time.perf_counter() - t0) * 1000
        if ok:
            pipe = self.redis.pipeline(transaction=False)
            pipe.zrem(keys.WEBHOOK_SCHEDULE, job_id)
            pipe.hset(keys.webhook(job_id), mapping={"status": "delivered", "last": why, "delivered_at": str(time.time())})
            await pipe.execute()
            DELIVERIES.labels("delivered").inc()
            log.info("job=%s webhook delivered to %s (%s, attempt %d, %.0f ms)", job_id, url, why, attempt, ms)
            return "delivered"
        if attempt >= s.webhook_max_attempts:
            await self._give_up(job_id, f"{why} after {attempt} attempts")
            return "gave_up"
        delay = wh.backoff_s(attempt, s.webhook_backoff_s)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(keys.WEBHOOK_SCHEDULE, {job_id: time.time() + delay})
        pipe.hset(keys.webhook(job_id), mapping={"status": "retrying", "last": why})
        await pipe.execute()
        DELIVERIES.labels("retry").inc()
        log.warning("job=%s webhook to %s failed (%s, attempt %d); retrying in %.1f s", job_id, url, why, attempt, delay)
        return "retry"

    async def _refuse(self, job_id: str, why: str) -> str:
        await self._give_up(job_id, why, outcome="refused")
        return "refused"

    async def _give_up(self, job_id: str, why: str, outcome: str = "gave_up") -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(keys.WEBHOOK_SCHEDULE, job_id)
        pipe.hset(keys.webhook(job_id), mapping={"status": outcome, "last": why})
        pipe.expire(keys.webhook(job_id), self.settings.result_ttl_seconds)
        await pipe.execute()
        DELIVERIES.labels(outcome).inc()
        log.warning("job=%s webhook %s: %s", job_id, outcome.replace("_", " "), why)


async def delivery_state(redis: aioredis.Redis, job_id: str) -> dict[str, Any] | None:
    """What the sender recorded about a job's webhook (for status pages and tests)."""
    raw = await redis.hgetall(keys.webhook(job_id))
    return {k.decode(): v.decode() for k, v in raw.items()} if raw else None
