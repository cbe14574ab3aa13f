"""Synchronous mask endpoints kept from the source segmentation service.

    POST /run_<model>   for every model whose ModelSpec says `sync=True` (tasks/models.py):
    /run_segmentation, /run_textmask, /run_facemask, /run_echo, /run_simulated

Body: image bytes (`image/jpeg|png|webp`, `application/octet-stream`; no Content-Type at
all counts as `application/octet-stream`: the image is sniffed from its bytes), optionally
`Content-Encoding: gzip`, or a small WebDataset tar (`application/x-tar`,
`application/x-tar+gzip`) answered as a batch. The answer is packbits by default
(`X-Mask-Format`, `X-Batch-Size` headers), PNG with `?format=png`, or COCO RLE JSON
(textmask's RLE answer also carries `regions`: the text quadrilaterals and their scores).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
from typing import Any
from urllib.parse import quote

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from api.body import gunzip_capped, raw_body_type, read_body
from api.deps import HubDep, SettingsDep, StoreDep, TenantDep
from storage import codecs
from storage.blob import BlobStore, FileStore
from tasks.errors import BadRequest, StorageError, TooManySamples, UnsupportedMediaType, from_code, translate
from tasks.images import IMAGE_CONTENT_TYPES, probe
from tasks.inputs import IN_REDIS, stage_key
from tasks.models import MODELS, sync_models
from tasks.settings import Settings
from tasks.tars import read_small_tar

log = logging.getLogger("trifecta.api")
router = APIRouter(tags=["sync masks"])
SYNC_MODELS = sync_models(MODELS.values())  # from the specs: ModelSpec.sync
TAR_TYPES = {"application/x-tar", "application/x-tar+gzip", "application/tar", "application/x-gtar"}


def mask_format(request: Request, settings: Settings) -> str:
    fmt = (request.query_params.get("format") or request.headers.get("x-mask-format") or settings.output_format).lower()
    if fmt not in codecs.FORMATS:
        raise BadRequest(f"format {fmt!r} is not one of {', '.join(codecs.FORMATS)}")
    return fmt


def sync_timeout(request: Request, settings: Settings) -> float:
    t = request.query_params.get("timeout")
    if t is None:
        return settings.sync_timeout_s
    try:
        v = float(t)
    except ValueError:
        raise BadRequest("timeout must be a number of seconds") from None
    if not 0 < v:
        raise BadRequest("timeout must be positive")
    return min(v, settings.sync_timeout_s)


async def fetch_output(store: BlobStore, out: str | dict[str, Any]) -> bytes:
    """An output's bytes: from the worker's reply (up to SYNC_REPLY_INLINE_BYTES, or any size with
    STORE_SYNC_RESULTS=false) or from storage (a key, or an output's `path`)."""
    if isinstance(out, dict):
        if out.get("data") is not None:
            return base64.b64decode(out["data"])
        if out.get("inline"):  # sent in a reply this process missed (its subscription dropped): never stored
            raise StorageError("the result was sent in the worker's reply only (STORE_SYNC_RESULTS=false) and that reply was missed; retry the request", headers={"Retry-After": "1"})
        path = out["path"]
    else:
        path = out
    if isinstance(store, FileStore):
        return store.get(path)  # a local read is faster than a thread hop
    return await asyncio.to_thread(store.get, path)


def inline_or_staged(data: bytes, settings: Settings, store: BlobStore, tenant: str, job_id: str, name: str = "input") -> tuple[dict[str, Any], bool]:
    """The `input` of a job's message: inline below INLINE_INPUT_BYTES, else staged in storage
    (a sync call's input goes through `SyncInputs`)."""
    if len(data) <= settings.inline_input_bytes:
        return {"b64": base64.b64encode(data).decode("ascii"), "size": len(data)}, False
    key = stage_key(tenant, job_id, name)
    store.put(key, data)
    return {"uri": f"key:{key}", "size": len(data)}, True


class SyncInputs:
    """The inputs of one sync call (one image, a tar's samples, a clip) on their way to its
    workers, the one path every sync route takes (`/run_*`, `/segment`, SAM3 image, V-JEPA 2
    `/api/v1/infer`):

        ins = SyncInputs(settings, store, tenant)
        q = hub.new_request(..., inp=await ins.add(data, job_id), reply=True)
        replies = await ins.run(hub, [q], timeout)

    An input up to INLINE_INPUT_BYTES travels inside the message. A larger one, up to
    SYNC_REDIS_INPUT_MAX_BYTES for the call's inputs together, is held in Redis: `Hub.submit`
    writes it in the submit transaction (no storage request, no extra round trip) under
    `keys.sync_input`, expiring with the request's deadline, and the worker deletes it in its
    FINISH. Only a larger one still is staged in storage (`name` names its object), and deleted
    once the call is answered. The answers' outputs ride in the workers' replies up to
    SYNC_REPLY_INLINE_BYTES (`fetch_output` reads them from there)."""

    def __init__(self, settings: Settings, store: BlobStore, tenant: str) -> None:
        self.settings, self.store, self.tenant = settings, store, tenant
        self.held: dict[str, bytes] = {}  # job id -> bytes, for Hub.submit
        self.staged: list[tuple[str, str]] = []  # (job id, name) in storage

    async def add(self, data: bytes, job_id: str, name: str = "input") -> dict[str, Any]:
        """The message's `input` for `data`."""
        s = self.settings
        if len(data) > s.inline_input_bytes and len(data) + sum(map(len, self.held.values())) <= s.sync_redis_input_max_bytes:
            self.held[job_id] = data
            return {"uri": IN_REDIS, "size": len(data)}
        if len(data) <= s.inline_input_bytes or isinstance(self.store, FileStore):  # a local write is faster than a thread hop
            inp, staged = inline_or_staged(data, s, self.store, self.tenant, job_id, name)
        else:
            inp, staged = await asyncio.to_thread(inline_or_staged, data, s, self.store, self.tenant, job_id, name)
        if staged:
            self.staged.append((job_id, name))
        return inp

    async def run(self, hub: Any, reqs: list[Any], timeout_s: float, queue: str | None = None) -> list[dict[str, Any]]:
        """`hub.run_sync` with the held inputs; then the staged ones are deleted (not after a 504:
        the request goes on as a job and its worker may still read them)."""
        replies = await hub.run_sync(reqs, timeout_s, queue=queue, inputs=self.held or None)
        if self.staged:
            await drop_staged(self.store, self.tenant, self.staged)
        return replies


async def drop_staged(store: BlobStore, tenant: str, staged: list[tuple[str, str]]) -> None:
    """A sync call's staged inputs (job id, name) once its replies are in (the job is finished: a
    redelivery skips it unread). Remote stores delete in the background; the janitor catches the rest."""
    if isinstance(store, FileStore):
        for j, name in staged:  # one file and its directories (delete_prefix's rmtree walks and stats); the job's own stays if it holds outputs
            f = store.root / stage_key(tenant, j, name)
            for undo in (f.unlink, f.parent.rmdir, f.parent.parent.rmdir):
                try:
                    undo()
                except OSError:
                    break
        return

    def _delete() -> None:
        for p in (os.path.dirname(stage_key(tenant, j, name)) for j, name in staged):
            try:
                store.delete_prefix(p)
            except Exception:  # noqa: BLE001 - the janitor removes it with the job's prefix
                log.warning("could not delete staged input %s", p)

    task = asyncio.get_running_loop().run_in_executor(None, _delete)
    _background.add(task)
    task.add_done_callback(_background.discard)


_background: set[Any] = set()


def raise_failed(reply: dict[str, Any]) -> None:
    err = reply.get("error") or {}
    raise from_code(err.get("code", "internal"), err.get("message", "the request failed"))


async def _run(model: str, request: Request, settings: Settings, hub: Any, store: BlobStore, tenant: str) -> Response:
    ctype = raw_body_type(request)
    is_tar = ctype in TAR_TYPES
    if not is_tar and ctype not in IMAGE_CONTENT_TYPES:
        raise UnsupportedMediaType(f"Content-Type {ctype!r} is not accepted; send image/jpeg, image/png, image/webp, application/octet-stream or application/x-tar")
    if is_tar and not settings.allow_webdataset:
        raise UnsupportedMediaType("WebDataset tar bodies are disabled on this server (ALLOW_WEBDATASET=false)")
    if model == "facemask" and not hub.live("facemask"):
        return Response(status_code=204)  # as the source service: no face model configured yet
    fmt = mask_format(request, settings)
    timeout = sync_timeout(request, settings)
    hub.admit(model, 0 if is_tar else 1)  # a tar reserves its places once its samples are counted (_run_tar)
    body = await read_body(request, settings.max_body_bytes)
    if is_tar:
        return await _run_tar(model, body, ctype, fmt, timeout, request, settings, hub, store, tenant)
    if model != "echo":  # echo never decodes: it measures the pipeline alone
        probe(body, settings.max_image_pixels)  # 415 / 413 / 422 from the header, before the queue
    job_id = _job_id()
    ins = SyncInputs(settings, store, tenant)
    inp = await ins.add(body, job_id)
    params = {"sleep_ms": _number(request.query_params["sleep_ms"], "sleep_ms")} if model == "echo" and "sleep_ms" in request.query_params else {}
    q = hub.new_request(model, tenant=tenant, kind="sync", params=params, fmt=fmt, timeout_s=timeout, inp=inp, job_id=job_id, reply=True)
    (reply,) = await ins.run(hub, [q], timeout)
    if reply["status"] != "succeeded":
        raise_failed(reply)
    result = reply["result"]
    # X-Batch-Size of one image: the images in the model call it ran in (dynamic batching), as /api/v1/infer answers
    headers = _timing_headers(q.id, result, int(result.get("timing", {}).get("batch_size") or 1), fmt)
    if model == "echo":  # orjson: Starlette's JSONResponse runs the stdlib encoder
        return Response(orjson.dumps({"job_id": q.id, **result["meta"], "timing": result["timing"]}), media_type="application/json", headers=headers)
    out = result["outputs"][0]
    data = await fetch_output(store, out)
    if fmt == "rle" and "regions" in (result.get("meta") or {}):
        data = orjson.dumps(with_regions(orjson.loads(data), result["meta"]))
    return Response(data, media_type=codecs.CONTENT_TYPES[fmt], headers=headers)


def with_regions(rle: dict[str, Any], meta: dict[str, Any] | None) -> dict[str, Any]:
    """An RLE answer with the model's `regions` beside `size` and `counts` (textmask: the text
    quadrilaterals and their scores, as in a job's result.json `meta`)."""
    return {**rle, "regions": meta["regions"]} if meta and "regions" in meta else rle


async def _run_tar(model: str, body: bytes, ctype: str, fmt: str, timeout: float, request: Request, settings: Settings, hub: Any, store: BlobStore, tenant: str) -> Response:
    if ctype == "application/x-tar+gzip":
        body = await asyncio.to_thread(gunzip_capped, body, settings.max_body_bytes)  # off the event loop
    if fmt == "png":
        raise BadRequest("png answers a single image; ask a tar batch for packbits or rle")
    samples = read_small_tar(io.BytesIO(body), max_member=settings.max_sample_bytes, max_members=settings.max_sync_batch * 8 + 8, max_total=settings.max_body_bytes)
    if len(samples) > settings.max_sync_batch:
        raise TooManySamples(f"the tar holds {len(samples)} samples; the sync endpoint takes at most {settings.max_sync_batch} (MAX_SYNC_BATCH). Submit it as a shard job: POST /v1/jobs with input.shards or a multipart file")
    hub.admit(model, len(samples))
    reqs, errors, order = [], {}, []
    ins = SyncInputs(settings, store, tenant)
    for i, s in enumerate(samples):
        img = s.image()
        order.append(s.key)
        if s.errors or img is None:
            errors[i] = {"index": i, "key": s.key, "code": "unprocessable", "message": "; ".join(s.errors) or "no image member (jpg, png, webp ...)"}
            continue
        try:
            probe(img[1], settings.max_image_pixels)
        except Exception as e:  # this sample alone fails
            te = translate(e)
            errors[i] = {"index": i, "key": s.key, "code": te.code, "message": te.message}
            continue
        job_id = _job_id()
        inp = await ins.add(img[1], job_id)
        reqs.append((i, hub.new_request(model, tenant=tenant, kind="sync", params={}, fmt=fmt, timeout_s=timeout, inp=inp, job_id=job_id, reply=True)))
    replies = await ins.run(hub, [q for _, q in reqs], timeout) if reqs else []
    masks: list[bytes | None] = [None] * len(samples)
    rles: list[Any] = [None] * len(samples)
    metas: list[Any] = [None] * len(samples)
    paths = []
    untrained = untrained_headers(*(rep.get("result") for rep in replies))
    for (i, _), rep in zip(reqs, replies, strict=True):
        if rep["status"] != "succeeded":
            err = rep.get("error") or {}
            errors[i] = {"index": i, "key": samples[i].key, "code": err.get("code", "internal"), "message": err.get("message", "")}
        else:
            metas[i] = rep["result"].get("meta")
            if rep["result"].get("outputs"):  # echo writes none
                paths.append((i, rep["result"]["outputs"][0]))
    datas = await asyncio.gather(*(fetch_output(store, p) for _, p in paths))
    for (i, _), d in zip(paths, datas, strict=True):
        masks[i] = d
        rles[i] = with_regions(orjson.loads(d), metas[i]) if fmt == "rle" else None
    headers = {"X-Mask-Format": fmt, "X-Batch-Size": str(len(samples)), **untrained, **_sample_headers(order, sorted(errors.values(), key=lambda e: e["index"]))}
    if model == "echo":  # echo writes no mask: each sample's answer is its meta, as for one image
        return JSONResponse({"keys": order, "results": metas, "errors": sorted(errors.values(), key=lambda e: e["index"])}, headers=headers)
    if fmt == "rle":
        return JSONResponse({"keys": order, "masks": rles, "errors": sorted(errors.values(), key=lambda e: e["index"])}, headers=headers)
    # a failed sample is a zero-length entry, so positions still match the tar's order
    return Response(codecs.encode_batch(m or b"" for m in masks), media_type="application/octet-stream", headers=headers)


HEADER_BUDGET = 8192  # response headers past 8-16 KiB are refused by common proxies (nginx) and clients (h11)


def _sample_headers(order: list[str], errors: list[dict[str, Any]]) -> dict[str, str]:
    """X-Sample-Keys and X-Sample-Errors. Keys come from member names, so they are percent-encoded
    (RFC 3986) and the errors are ASCII JSON: a comma, newline or non-ASCII name cannot break a header.
    Past HEADER_BUDGET only indexes and codes are sent; `?format=rle` has everything in its body."""
    keys = ",".join(quote(k, safe="/") for k in order)
    errs = json.dumps(errors, ensure_ascii=True, separators=(",", ":")) if errors else ""
    if len(keys) + len(errs) <= HEADER_BUDGET:
        return {"X-Sample-Keys": keys, **({"X-Sample-Errors": errs} if errs else {})}
    short = json.dumps([{"index": e["index"], "code": e["code"]} for e in errors], separators=(",", ":")) if errors else ""
    return {"X-Sample-Keys-Omitted": "too long for a header; ask ?format=rle for the keys", **({"X-Sample-Errors": short} if short else {})}


def _number(v: str, name: str) -> float:
    try:
        return float(v)
    except ValueError:
        raise BadRequest(f"{name} must be a number") from None


def untrained_headers(*results: dict[str, Any] | None) -> dict[str, str]:
    """`X-Model-Untrained: true` when a random-init or tiny model gave any of these results
    (the worker's `trained: false`): the answer has the right shape and no meaning."""
    return {"X-Model-Untrained": "true"} if any(r and r.get("trained") is False for r in results) else {}


def _timing_headers(job_id: str, result: dict[str, Any], n: int, fmt: str) -> dict[str, str]:
    t = result.get("timing", {})
    return {
        **untrained_headers(result),
        "X-Mask-Format": fmt,
        "X-Batch-Size": str(n),
        "X-Job-Id": job_id,
        "X-Queue-Ms": str(t.get("queue_ms", "")),
        "X-Model-Ms": str(t.get("model_ms", "")),
        "X-Worker": str(result.get("worker", "")),
    }


def _job_id() -> str:
    from api.hub import new_job_id

    return new_job_id()


async def run_sync_endpoint(model: str, request: Request, settings: Settings, hub: Any, store: BlobStore, tenant: str) -> Response:
    """One sync call, as its route and api.fastpath both serve it; errors come out as TrifectaError."""
    try:
        return await _run(model, request, settings, hub, store, tenant)
    except Exception as e:
        raise translate(e) from e


def _make(model: str):  # noqa: ANN202 - FastAPI endpoint factory
    async def endpoint(request: Request, settings: SettingsDep, hub: HubDep, store: StoreDep, tenant: TenantDep) -> Response:
        return await run_sync_endpoint(model, request, settings, hub, store, tenant)

    endpoint.__name__ = f"run_{model}"
    endpoint.__doc__ = f"Segment one image (or a small WebDataset tar) with `{model}`; waits at most SYNC_TIMEOUT_S."
    return endpoint


for _m in SYNC_MODELS:
    router.add_api_route(
        f"/run_{_m}",
        _make(_m),
        methods=["POST"],
        response_class=Response,
        responses={200: {"content": {"application/octet-stream": {}, "image/png": {}, "application/json": {}}}, 204: {"description": "no model configured (facemask)"}},
        # the body is raw bytes read by hand: declared for the docs and for fuzzing
        openapi_extra={"requestBody": {"required": True, "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in ("image/png", "image/jpeg", "image/webp", "application/octet-stream", "application/x-tar")}}},
    )
