"""The janitor: deletes what jobs and sync requests stored once their record expired.

Every output, staged input and result.json of a request lives under `<tenant>/jobs/<id>/`.
Whatever writes there also puts the prefix in the expiry index (`tf:expiry`, a sorted set
scored by the earliest time the record can have expired): the API at submit (a job, a sync
request's staged input), the worker when it stores a sync request's outputs. Every
JANITOR_INTERVAL_S one API process (a Redis lock elects it) reads only the entries now due:

- record gone → the prefix is deleted (on S3: one LIST per prefix, DeleteObjects in batches of
  1,000 keys across prefixes) and the entry removed;
- record still there (a sync request that timed out became a job, its lifetime grew) → the
  entry is re-scored to the record's own expiry.

A pass costs what expired, not what is stored. Objects nobody indexed (a submit that crashed
between staging an input and writing its record, data from before the index existed) are
left to the bucket lifecycle rule (`trifecta storage lifecycle --apply`) or to a one-off
`trifecta storage sweep --all`, which lists the whole store as the janitor once did.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid

import redis.asyncio as aioredis

from api.metrics import JANITOR_DELETED
from storage.blob import BlobStore, FileStore, S3Store, open_store
from tasks import keys
from tasks.settings import Settings

log = logging.getLogger("trifecta.janitor")
CHUNK = 1000  # due entries read (and prefixes deleted) per round


def job_id_of(prefix: str) -> str | None:
    """`<tenant>/jobs/<id>` → id; None for anything else (never deleted)."""
    parts = prefix.split("/")
    if len(parts) != 3 or parts[1] != "jobs" or not parts[0] or not parts[2] or parts[0] in (".", "..") or parts[2] in (".", ".."):
        return None
    return parts[2]


async def sweep(redis: aioredis.Redis, store: BlobStore, now: float | None = None, result_ttl_s: float = 86_400) -> int:
    """One pass over the due entries of the expiry index; returns the number of objects deleted."""
    now = time.time() if now is None else now
    deleted = 0
    while True:
        due = [m.decode() for m in await redis.zrangebyscore(keys.EXPIRY, "-inf", now, start=0, num=CHUNK)]
        if not due:
            break
        ids = [job_id_of(m) for m in due]
        pipe = redis.pipeline(transaction=False)
        for jid in ids:
            pipe.pttl(keys.job(jid or "-"))
        ttls = await pipe.execute()
        later: dict[str, float] = {}
        gone: list[str] = []
        junk: list[str] = []
        for m, jid, pttl in zip(due, ids, ttls, strict=True):
            if jid is None:
                junk.append(m)
            elif pttl == -2:  # no record: expired
                gone.append(m)
            else:  # still alive (no TTL at all: give it a job's lifetime before looking again)
                later[m] = now + (pttl / 1000 if pttl >= 0 else result_ttl_s) + 1
        if gone:
            n = await asyncio.to_thread(store.delete_prefixes, gone)
            deleted += n
            log.info("deleted %d stored object(s) of %d expired request(s)", n, len(gone))
        pipe = redis.pipeline(transaction=False)
        if gone or junk:
            pipe.zrem(keys.EXPIRY, *gone, *junk)
        if later:
            pipe.zadd(keys.EXPIRY, later)
        await pipe.execute()
    if deleted:
        JANITOR_DELETED.inc(deleted)
    return deleted


# ---------------------------------------------------------------- the one-off full sweep
def job_prefixes(store: BlobStore) -> list[tuple[str, str]]:
    """(tenant, job id) of every `<tenant>/jobs/<id>/` in the store: lists all of it."""
    out: list[tuple[str, str]] = []
    if isinstance(store, FileStore):
        root = store.root
        if not root.is_dir():
            return out
        for tenant in os.scandir(root):
            jobs = os.path.join(tenant.path, "jobs")
            if tenant.is_dir() and not tenant.name.startswith(".") and os.path.isdir(jobs):
                out.extend((tenant.name, j.name) for j in os.scandir(jobs) if j.is_dir() and not j.name.startswith("."))
    elif isinstance(store, S3Store):
        base = f"{store.prefix}/" if store.prefix else ""
        pages = store.client.get_paginator("list_objects_v2")
        for tp in pages.paginate(Bucket=store.bucket, Prefix=base, Delimiter="/"):
            for cp in tp.get("CommonPrefixes", []):
                tenant = cp["Prefix"][len(base) :].rstrip("/")
                for jp in pages.paginate(Bucket=store.bucket, Prefix=f"{cp['Prefix']}jobs/", Delimiter="/"):
                    out.extend((tenant, c["Prefix"].rstrip("/").rsplit("/", 1)[-1]) for c in jp.get("CommonPrefixes", []))
    return out


async def sweep_all(redis: aioredis.Redis, store: BlobStore, min_age_s: float = 3600) -> int:
    """List every job prefix and delete those with no record: data from before the expiry index,
    or from submits that crashed. Costs what is stored; for a one-off cleanup, not every pass.
    A prefix younger than `min_age_s` (by its newest file, file:// only) is left alone: its
    record may be about to be written."""
    prefixes = await asyncio.to_thread(job_prefixes, store)
    deleted = 0
    for i in range(0, len(prefixes), CHUNK):
        part = prefixes[i : i + CHUNK]
        pipe = redis.pipeline(transaction=False)
        for _, job_id in part:
            pipe.exists(keys.job(job_id))
        res = await pipe.execute()
        old = [keys.job_prefix(t, j) for (t, j), alive in zip(part, res, strict=True) if not alive and _older(store, keys.job_prefix(t, j), min_age_s)]
        if old:
            deleted += await asyncio.to_thread(store.delete_prefixes, old)
    return deleted


def _older(store: BlobStore, prefix: str, age_s: float) -> bool:
    if not isinstance(store, FileStore):
        return True  # S3: the caller runs it when no submit is in flight (or relies on the lifecycle rule)
    try:
        newest = max((e.stat().st_mtime for e in os.scandir(store.root / prefix)), default=0.0)
    except OSError:
        return False
    return time.time() - newest >= age_s


class Janitor:
    def __init__(self, settings: Settings, redis: aioredis.Redis) -> None:
        self.settings, self.redis = settings, redis
        self.id = uuid.uuid4().hex
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.settings.janitor_interval_s > 0:
            self._task = asyncio.create_task(self._run(), name="janitor")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        s = self.settings
        store = open_store(s.storage_url, s.s3_endpoint_url)
        while True:
            await asyncio.sleep(s.janitor_interval_s)
            try:
                # one API process per interval does the pass
                if await self.redis.set(keys.JANITOR_LOCK, self.id, nx=True, px=max(1, int(s.janitor_interval_s * 900))):
                    await sweep(self.redis, store, result_ttl_s=s.result_ttl_seconds)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - Redis or storage trouble (botocore errors too): the next pass tries again
                log.warning("janitor pass failed (%s); next in %.0f s", e, s.janitor_interval_s)
