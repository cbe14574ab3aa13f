"""WebDataset shard jobs: `POST /v1/jobs` with `input.shards`, or one shard uploaded as multipart `file`.

    {"model": "textmask", "input": {"shards": ["s3://bucket/shard-{000..099}.tar"]}, "params": {"format": "png"}}

Shard URIs are brace-expanded as webdataset does (`::` separates patterns, then
`braceexpand`, the package webdataset itself uses; the API must not import webdataset,
which imports torch), each checked like any input URI (`tasks.inputs.check_input_uri`:
the tenant's own S3 prefix or INPUT_URI_ALLOWLIST; `file://` only under
ALLOWED_INPUT_ROOTS), then the job record and one `trifecta.shard` message per shard go
out in one pipeline onto `<model>:shards`, a queue every worker of the model consumes
besides its sync queue, so a bulk job never delays sync requests nor fills their 503
budget (a shard job gets 503 only with Redis away or no live worker of its model). The workers do the rest (workers/shards.py); the job's `progress` carries
shards and samples total/done/failed, throughput and an ETA.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from braceexpand import braceexpand
from redis.exceptions import RedisError

from api.hub import Hub
from api.routes.jobs import register_input_kind
from storage import codecs
from storage.blob import BlobStore
from tasks import keys
from tasks.errors import BadRequest, PayloadTooLarge, Unprocessable
from tasks.inputs import STAGED, check_input_uri, stage_key
from tasks.jobstore import shards as shardjobs
from tasks.models import MODELS
from tasks.settings import Settings
from tasks.wire import build_message

_INNER = re.compile(r"\{([^{}]*)\}")
_NUM = re.compile(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?")
_CHR = re.compile(r"([A-Za-z])\.\.([A-Za-z])(?:\.\.(-?\d+))?")
MAX_PATTERN = 4096


def expansion_bound(pattern: str) -> int:
    """An upper bound of how many names `braceexpand(pattern)` yields, without expanding.

    `braceexpand` builds numeric ranges eagerly, so `{0..99999999999}` must be refused
    before it is expanded. Innermost groups are counted and replaced until none is left;
    the product over-counts nested alternatives, never under-counts.
    """
    n, s = 1, pattern
    while True:
        m = _INNER.search(s)
        if m is None:
            return n
        body = m.group(1)
        r = _NUM.fullmatch(body) or _CHR.fullmatch(body)
        if r:
            a, b = (int(r.group(1)), int(r.group(2))) if r.re is _NUM else (ord(r.group(1)), ord(r.group(2)))
            step = abs(int(r.group(3) or 1)) or 1
            count = abs(b - a) // step + 1
        else:
            count = body.count(",") + 1
        n *= count
        if n > 1 << 40:
            return n
        s = s[: m.start()] + "x" + s[m.end() :]


def expand_shards(spec: Any, limit: int) -> list[str]:
    """`input.shards` (a string or a list of strings, brace notation) → the shard URIs, in order."""
    patterns = [spec] if isinstance(spec, str) else spec
    if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise Unprocessable('input.shards must be a URI or a non-empty list of URIs, e.g. ["s3://bucket/shard-{000..099}.tar"]')
    out: list[str] = []
    for p in (q for pat in patterns for q in pat.split("::")):  # webdataset's own separator
        if len(p) > MAX_PATTERN:
            raise Unprocessable(f"a shard pattern is longer than {MAX_PATTERN} characters")
        if len(out) + expansion_bound(p) > limit:
            raise PayloadTooLarge(f"input.shards expands to more than {limit} shards (MAX_SHARDS_PER_JOB); split the job")
        out.extend(braceexpand(p))
    return out


async def submit_shards(
    *, hub: Hub, settings: Settings, store: BlobStore, tenant: str, job_id: str, model: str, input: dict[str, Any], params: dict[str, Any], callback_url: str | None, upload: Any = None
) -> dict[str, Any]:
    spec = MODELS[model]
    if not spec.takes_images:
        raise Unprocessable(f"{model!r} does not take images; shard jobs need one of {', '.join(m for m, s in MODELS.items() if s.takes_images)}")
    fmt = str(params.get("format", settings.output_format)).lower()
    if fmt not in codecs.FORMATS:
        raise Unprocessable(f"params.format {fmt!r} is not one of {', '.join(codecs.FORMATS)}")
    if upload is not None:  # one shard as a multipart `file`: Starlette spooled it to disk; copy it to storage in chunks
        hub.check(model, 0)  # 503 (Redis away, no live worker) before the copy
        key = stage_key(tenant, job_id, "shard.tar")
        size = await asyncio.to_thread(store.put_stream, key, upload.file, "application/x-tar")
        uris = [f"{STAGED}{key}"]
        summary: dict[str, Any] = {"kind": "shards", "shards": 1, "upload": str(input.get("upload") or upload.filename or "shard.tar"), "bytes": size}
    else:
        uris = expand_shards(input.get("shards"), settings.max_shards_per_job)
        for u in uris:
            if u.startswith(STAGED):
                raise BadRequest("shard URIs are s3://bucket/key or file:///path")
            check_input_uri(u, tenant, settings)  # 400 / 403 before anything is queued
        hub.check(model, 0)  # 503 (Redis away, no live worker); no depth: the shard queue is not the sync budget
        summary = {"kind": "shards", "shards": len(uris), "first": uris[0], "last": uris[-1]}
    now = time.time()
    worker_params = {k: v for k, v in params.items() if k != "format"}
    progress = {"shards_total": len(uris), "shards_done": 0, "shards_running": 0, "samples_total": 0, "samples_done": 0, "samples_failed": 0, "samples_total_exact": False, "throughput": 0, "eta_s": None}
    doc = {"id": job_id, "model": model, "kind": "job", "tenant": tenant, "created_at": now, "params": params, "input": summary, "callback_url": callback_url, "progress": progress}
    ttl = settings.result_ttl_seconds
    queue = keys.shard_queue(model)
    out_prefix = f"{tenant}/jobs/{job_id}"
    msgs = [
        build_message(
            keys.TASK_SHARD, f"{job_id}.{i}",
            {"job": job_id, "index": i, "uri": u, "model": model, "format": fmt, "params": worker_params, "tenant": tenant, "out_prefix": out_prefix, "created": now},
            queue,
        )
        for i, u in enumerate(uris)
    ]
    pipe = hub.redis.pipeline(transaction=False)
    shardjobs.create(pipe, doc, len(uris), ttl)
    for i in range(0, len(msgs), 1000):
        pipe.lpush(hub.qkeys.queue(queue), *msgs[i : i + 1000])  # LPUSH + the workers' BRPOP: shards run in order
    try:
        await pipe.execute()
    except (RedisError, OSError) as e:
        raise hub.redis_failed(e) from None
    return doc


register_input_kind("shards", submit_shards)
