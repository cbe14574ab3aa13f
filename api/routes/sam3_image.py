"""SAM3 image segmentation, the source services' contract.

    POST /api/v1/image/segment          JSON {"image": base64, "prompts": [...], "confidence_threshold"}
                                        or multipart `file` + `prompt` (answer adds `num_objects`)
    POST /api/v1/image/cached-features  {"image", "text_prompts": [...], "confidence_threshold"}

Each request is one `trifecta.infer` message for `sam3` (params: the normalised prompts;
format rle). It goes to the private queue of the worker that owns the image's SHA-256 on
a consistent-hash ring of the live sam3 workers, so that worker's feature cache answers
every later request for the same image (`tasks.routing`); to the shared queue when that
worker's heartbeat has stopped. The worker writes the RLE masks, boxes and scores as one
JSON object (`instances.json`); the answer is built from it here. Its input and that object
take the sync path every sync route shares (`api.routes.sync.SyncInputs`): an image over
INLINE_INPUT_BYTES waits in Redis, not in storage, and the object rides in the worker's reply
up to SYNC_REPLY_INLINE_BYTES (read back from storage only when larger).

503: the admission gate (`api/admission.py`) answers for a full sam3 backlog before the body
is read; once the image is known, a full private queue of its worker answers 503 too
(`Hub.admit(..., queue=)`), while images owned by the other workers still pass.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.body import counted_request, read_body
from api.deps import HubDep, SettingsDep, StoreDep, TenantDep
from api.routes.sync import SyncInputs, fetch_output, raise_failed, sync_timeout, untrained_headers
from storage.blob import BlobStore
from tasks.errors import PayloadTooLarge, Unprocessable, UnsupportedMediaType, translate
from tasks.images import probe
from tasks.routing import image_key, pick_queue
from tasks.sam3 import MODEL, RESULT_KEY, Sam3Params, parse_prompts, parse_threshold, prompts_param
from tasks.settings import Settings

router = APIRouter(prefix="/api/v1/image", tags=["sam3 image"])

_SEGMENT_DOC = {
    "requestBody": {
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["image", "prompts"],
                    "properties": {
                        "image": {"type": "string", "description": "base64 image (JPEG, PNG, WebP …)"},
                        "prompts": {"type": "array", "items": {"type": "object"}, "example": [{"type": "text", "text": "person"}, {"type": "box", "box": [0.3, 0.4, 0.2, 0.3], "label": True}]},
                        "confidence_threshold": {"type": "number", "minimum": 0, "maximum": 1},
                    },
                }
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "prompt"],
                    "properties": {"file": {"type": "string", "format": "binary"}, "prompt": {"type": "string"}, "confidence_threshold": {"type": "number"}},
                }
            },
        }
    }
}
_CACHED_DOC = {
    "requestBody": {
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["image", "text_prompts"],
                    "properties": {
                        "image": {"type": "string"},
                        "text_prompts": {"type": "array", "items": {"type": "string"}, "example": ["person", "car"]},
                        "confidence_threshold": {"type": "number"},
                    },
                }
            }
        }
    }
}


def decode_image(v: Any) -> bytes:
    if not isinstance(v, str) or not v:
        raise Unprocessable("image must be a base64 string of the image bytes")
    if v.startswith("data:") and "," in v[:200]:  # a data URL: data:image/png;base64,....
        v = v.split(",", 1)[1]
    try:
        data = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise Unprocessable("image is not valid base64") from None
    if not data:
        raise Unprocessable("image is empty")
    return data


async def _json_body(request: Request, settings: Settings) -> dict[str, Any]:
    raw = await read_body(request, settings.max_body_bytes)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise Unprocessable("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise Unprocessable("the body must be a JSON object")
    return body


async def _segment_inputs(request: Request, settings: Settings) -> tuple[bytes, Sam3Params, bool]:
    """(image bytes, params, is_form) from either request shape."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {settings.max_body_bytes} (MAX_BODY_BYTES)")
        # counted while it streams: Starlette spools file parts to disk with no limit of its own (chunked bodies too)
        form = await counted_request(request, settings.max_body_bytes, settings.max_body_bytes).form(max_files=1, max_fields=8, max_part_size=settings.max_body_bytes)
        up = form.get("file")
        if up is None or isinstance(up, str):
            raise Unprocessable("the form needs a `file` part with the image")
        data = await up.read(settings.max_body_bytes + 1)
        if len(data) > settings.max_body_bytes:
            raise PayloadTooLarge(f"the file is over {settings.max_body_bytes} bytes (MAX_BODY_BYTES)")
        prompt = form.get("prompt")
        if not isinstance(prompt, str):
            raise Unprocessable("the form needs a `prompt` field (a text prompt such as `a car`)")
        texts, boxes = parse_prompts([{"type": "text", "text": prompt}], max_prompts=settings.max_prompts, where="prompt")
        th = form.get("confidence_threshold")
        threshold = None
        if isinstance(th, str) and th.strip():
            try:
                threshold = parse_threshold(float(th))
            except ValueError:
                raise Unprocessable("confidence_threshold must be a number between 0 and 1") from None
        if not data:
            raise Unprocessable("the `file` part is empty")
        return data, Sam3Params(texts, boxes, threshold), True
    if ctype != "application/json":
        raise UnsupportedMediaType("POST /api/v1/image/segment takes application/json ({image, prompts}) or multipart/form-data (file, prompt)")
    body = await _json_body(request, settings)
    if "prompts" not in body:
        raise Unprocessable('prompts is required: [{"type": "text", "text": "person"}, {"type": "box", "box": [cx, cy, w, h], "label": true}]')
    texts, boxes = parse_prompts(body["prompts"], max_prompts=settings.max_prompts)
    threshold = parse_threshold(body.get("confidence_threshold"))
    return decode_image(body.get("image")), Sam3Params(texts, boxes, threshold), False


async def run_sam3(request: Request, data: bytes, params: Sam3Params, settings: Settings, hub: Any, store: BlobStore, tenant: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """Enqueue one sam3 request on the worker owning the image and wait: (instances doc, meta, headers)."""
    probe(data, settings.max_image_pixels)  # 415 / 413 / 422 from the header, before the queue
    timeout = sync_timeout(request, settings)
    key = image_key(data)
    queue = pick_queue(hub.live(MODEL), key, model=MODEL, stale_after_s=2 * settings.worker_heartbeat_s + 1)
    hub.admit(MODEL, queue=queue)  # 503 from memory when that worker's own queue is full, while the others take work
    from api.hub import new_job_id

    job_id = new_job_id()
    ins = SyncInputs(settings, store, tenant)
    inp = await ins.add(data, job_id)
    wire: dict[str, Any] = {"prompts": prompts_param(params)}
    if params.confidence_threshold is not None:
        wire["confidence_threshold"] = params.confidence_threshold
    q = hub.new_request(MODEL, tenant=tenant, kind="sync", params=wire, fmt="rle", timeout_s=timeout, inp=inp, job_id=job_id, reply=True)
    (reply,) = await ins.run(hub, [q], timeout, queue=queue)
    if reply["status"] != "succeeded":
        raise_failed(reply)
    result = reply["result"]
    out = next((o for o in result["outputs"] if o["key"] == RESULT_KEY), None)
    if out is None:
        raise Unprocessable("the worker answered without masks")
    doc = orjson.loads(await fetch_output(store, out))
    meta = result.get("meta") or {}
    headers = {
        "X-Job-Id": q.id,
        "X-Worker": str(result.get("worker", "")),
        "X-Queue": queue,
        "X-Cache-Hit": "true" if meta.get("cache_hit") else "false",
        "X-Queue-Ms": str(result.get("timing", {}).get("queue_ms", "")),
        **untrained_headers(result),
    }
    return doc, meta, headers


@router.post("/segment", summary="Segment an image with text and/or box prompts", openapi_extra=_SEGMENT_DOC)
async def segment(request: Request, settings: SettingsDep, hub: HubDep, store: StoreDep, tenant: TenantDep) -> JSONResponse:
    try:
        data, params, is_form = await _segment_inputs(request, settings)
        doc, meta, headers = await run_sam3(request, data, params, settings, hub, store, tenant)
    except Exception as e:
        raise translate(e) from e
    masks, boxes, scores = [], [], []
    for r in doc["results"]:
        masks += r["masks"]
        boxes += r["boxes"]
        scores += r["scores"]
    body: dict[str, Any] = {
        "masks": masks,
        "boxes": boxes,
        "scores": scores,
        "num_masks": len(masks),
        "image_size": doc["image_size"],
        "inference_time_ms": meta.get("inference_time_ms", 0.0),
    }
    if is_form:
        body["num_objects"] = len(masks)
    return JSONResponse(body, headers=headers)


@router.post("/cached-features", summary="Many text prompts on one image: the vision encoder runs once", openapi_extra=_CACHED_DOC)
async def cached_features(request: Request, settings: SettingsDep, hub: HubDep, store: StoreDep, tenant: TenantDep) -> JSONResponse:
    try:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise UnsupportedMediaType("POST /api/v1/image/cached-features takes application/json ({image, text_prompts})")
        body = await _json_body(request, settings)
        raw = body.get("text_prompts")
        if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
            raise Unprocessable('text_prompts must be a list of strings, e.g. ["person", "car"]')
        texts, _ = parse_prompts(raw, max_prompts=settings.max_prompts, where="text_prompts")
        params = Sam3Params(texts, (), parse_threshold(body.get("confidence_threshold")))
        doc, meta, headers = await run_sam3(request, decode_image(body.get("image")), params, settings, hub, store, tenant)
    except Exception as e:
        raise translate(e) from e
    results = [{"prompt": r["prompt"], "masks": r["masks"], "boxes": r["boxes"], "scores": r["scores"], "num_masks": r["num_masks"]} for r in doc["results"]]
    return JSONResponse({"results": results, "cache_hit": bool(meta.get("cache_hit")), "inference_time_ms": meta.get("inference_time_ms", 0.0)}, headers=headers)
