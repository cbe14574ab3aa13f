"""The janitor: deletes the stored outputs of jobs whose record expired (RESULT_TTL_SECONDS).

Every output, staged input and result.json of a request lives under `<tenant>/jobs/<id>/`
(sync requests too). Every JANITOR_INTERVAL_S one API process (a Redis lock elects it)
lists those prefixes and deletes each whose job record is gone while its tombstone is
still there — exactly the jobs that answer `expired`. The tombstone outlives the record
by 7 days, so a prefix is always seen at least once in that window. A prefix with neither
record nor tombstone is left alone: it may be an input being staged right now, before
its record is written (for leftovers from crashed submits, an S3 lifecycle rule on the
bucket is the backstop; see docs/readme/operations.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid

import redis.asyncio as aioredis

from api.metrics import JANITOR_DELETED
from storage.blob import BlobStore, FileStore, S3Store, open_store
from tasks import keys
from tasks.settings import Settings

log = logging.getLogger("trifecta.janitor")
CHUNK = 500


def job_prefixes(store: BlobStore) -> list[tuple[str, str]]:
    """(tenant, job id) of every `<tenant>/jobs/<id>/` in the store."""
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


async def sweep(redis: aioredis.Redis, store: BlobStore) -> int:
    """One pass; returns the number of objects deleted."""
    prefixes = await asyncio.to_thread(job_prefixes, store)
    deleted = 0
    for i in range(0, len(prefixes), CHUNK):
        part = prefixes[i : i + CHUNK]
        pipe = redis.pipeline(transaction=False)
        for _, job_id in part:
            pipe.exists(keys.job(job_id))
            pipe.exists(keys.tomb(job_id))
        res = await pipe.execute()
        for n, (tenant, job_id) in enumerate(part):
            if not res[2 * n] and res[2 * n + 1]:
                k = await asyncio.to_thread(store.delete_prefix, f"{tenant}/jobs/{job_id}")
                deleted += k
                log.info("job=%s expired: deleted %d stored object(s)", job_id, k)
    if deleted:
        JANITOR_DELETED.inc(deleted)
    return deleted


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
                    await sweep(self.redis, store)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - Redis or storage trouble (botocore errors too): the next pass tries again
                log.warning("janitor pass failed (%s); next in %.0f s", e, s.janitor_interval_s)
