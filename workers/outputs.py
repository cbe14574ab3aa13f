"""A batch's outputs: encoded, stored or carried in the reply, and sync answers sent before their masks are stored."""

from __future__ import annotations

import base64
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import redis

from storage import codecs
from storage.blob import BlobStore
from tasks import jobstore
from tasks.errors import TrifectaError, translate
from tasks.schemas import InferRequest, Output
from tasks.settings import Settings
from workers.runners.base import Produced

log = logging.getLogger("trifecta.worker")
# STORE_SYNC_RESULTS=false: a request's outputs past this many bytes are stored anyway, since a
# pub/sub message of many MB can get the API's subscriber cut off by Redis's pubsub output
# buffer limit (8 MB for 60 s / 32 MB by default); stored ones expire with the record
INLINE_REPLY_MAX = 4 << 20


class Outputs:
    """WorkerService's output writing; the attributes are WorkerService's."""

    settings: Settings
    store: BlobStore
    r: redis.Redis
    _io: ThreadPoolExecutor

    def _publish_outputs(self, q: InferRequest, res: Produced, later: dict[str, list[tuple[str, bytes, str]]] | None = None) -> tuple[list[Output], dict[str, Any]]:
        # an answered sync request with STORE_SYNC_RESULTS=false stores nothing: its outputs ride in the reply;
        # with true, outputs up to SYNC_REPLY_INLINE_BYTES ride in the reply too (the API answers without a
        # storage GET) and are stored for the record as well
        reply_only = q.kind == "sync" and bool(q.reply) and not self.settings.store_sync_results
        budget = INLINE_REPLY_MAX if reply_only else (self.settings.sync_reply_inline_bytes if q.kind == "sync" and q.reply else -1)
        outs: list[Output] = []
        items = [(key, codecs.encode(mask, q.format), q.format, codecs.CONTENT_TYPES[q.format], list(mask.shape), f"{q.out_prefix}/{key}.{codecs.EXTENSIONS[q.format]}") for key, mask in res.masks.items()]
        items += [(key, data, fmt, ctype, [], f"{q.out_prefix}/{key}") for key, (data, fmt, ctype) in res.blobs.items()]
        for key, data, fmt, ctype, shape, path in items:
            out = Output(key=key, format=fmt, shape=shape, path=path, bytes=len(data), content_type=ctype)
            if len(data) <= budget:
                budget -= len(data)
                out.inline, out.data = reply_only, base64.b64encode(data).decode("ascii")
            if later is not None and out.data is not None and not reply_only:  # stored once the reply is out
                later.setdefault(q.id, []).append((path, data, ctype))
            elif not out.inline:
                self.store.put(path, data, ctype)
            outs.append(out)
        return outs, res.meta

    def _reply_then_store(
        self, done: list[tuple[InferRequest, str, dict[str, Any]]], later: dict[str, list[tuple[str, bytes, str]]]
    ) -> tuple[list[tuple[InferRequest, str, dict[str, Any]]], set[str]]:
        """On a remote store, sync answers whose masks ride in the reply (SYNC_REPLY_INLINE_BYTES) are
        published first (one pipeline), then their masks are written, then FINISH records them (without
        publishing again): the storage PUT is off the caller's critical path. The record says `running`
        until the masks are stored, so a `succeeded` record always has its objects. A mask that cannot
        be stored fails the record (`storage_error`) although the caller has its answer. Returns the
        batch's outcomes and the ids already answered."""
        early = [(q, st, body) for q, st, body in done if st == "succeeded" and q.reply and q.id in later]
        replied: set[str] = set()
        if early:
            pipe = self.r.pipeline(transaction=False)
            for q, st, body in early:
                pipe.publish(q.reply, jobstore.reply_payload(q.id, st, {"result": body}))
            try:
                pipe.execute()
                replied = {q.id for q, _, _ in early}
            except redis.RedisError as e:  # FINISH publishes them instead, after the writes
                log.warning("early replies of %d sync requests not sent (%s); sent with their records", len(early), e)
        puts = {jid: self._io.submit(_put_all, self.store, objs) for jid, objs in later.items()}
        out = []
        for q, st, body in done:
            f = puts.get(q.id)
            if f is not None and st == "succeeded":
                try:
                    f.result()
                except Exception as e:  # noqa: BLE001 - recorded as the request's failure
                    st, body = "failed", _err(translate(e))
            out.append((q, st, body))
        return out, replied


def _put_all(store: BlobStore, objs: list[tuple[str, bytes, str]]) -> None:
    for path, data, ctype in objs:
        store.put(path, data, ctype)


def _now(fn: Any, *args: Any) -> Future[Any]:
    """`fn(*args)` run here, as a finished future (same shape as the storage pool's)."""
    f: Future[Any] = Future()
    try:
        f.set_result(fn(*args))
    except Exception as e:  # noqa: BLE001 - delivered through the future, as the pool would
        f.set_exception(e)
    return f


def _err(e: TrifectaError) -> dict[str, Any]:
    return jobstore.error(e)
