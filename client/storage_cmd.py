"""`trifecta storage`: upkeep of the blob store.

trifecta storage lifecycle [--days N] [--apply]   the S3 bucket lifecycle rule backing the janitor
trifecta storage sweep [--all]                    one janitor pass now (--all: list the whole store)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math

from storage.blob import S3Store, open_store
from tasks.settings import get_settings


def lifecycle_days(result_ttl_s: int) -> int:
    """Days after which a job's objects may go: its lifetime, rounded up, plus a day (the janitor deletes them first)."""
    return math.ceil(result_ttl_s / 86_400) + 1


def main(a: argparse.Namespace) -> int:
    s = get_settings()
    store = open_store(s.storage_url, s.s3_endpoint_url)
    if a.action == "lifecycle":
        if not isinstance(store, S3Store):
            print(f"{store.url} is not an S3 bucket: there is no lifecycle rule to set; the API's janitor deletes expired objects (JANITOR_INTERVAL_S)")
            return 0
        days = a.days or lifecycle_days(s.result_ttl_seconds)
        if a.apply:
            rules = store.apply_lifecycle(days)
            print(json.dumps({"bucket": store.bucket, "Rules": rules}, indent=2))
            print(f"set: objects tagged trifecta=job under s3://{store.bucket}/{store.prefix} expire after {days} day(s)")
        else:
            print(json.dumps({"Rules": [store.lifecycle_rule(days)]}, indent=2))
            print(
                f"# not applied; `trifecta storage lifecycle --apply` sets it on s3://{store.bucket}, or: aws s3api put-bucket-lifecycle-configuration --bucket {store.bucket} --lifecycle-configuration file://rule.json"
            )
        return 0
    import redis.asyncio as aioredis

    from api.janitor import sweep, sweep_all

    async def go() -> int:
        r = aioredis.Redis.from_url(s.redis_url)
        try:
            return await (sweep_all(r, store) if a.all else sweep(r, store, result_ttl_s=s.result_ttl_seconds))
        finally:
            await r.aclose()

    print(f"deleted {asyncio.run(go())} object(s) from {store.url}")
    return 0
