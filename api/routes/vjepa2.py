"""V-JEPA 2 video classification, kept from the source service, and the service's front page.

    POST /api/v1/infer     {"frames": [16 base64 frames], "width", "height", "format": "BGR"|"RGB"}
                           → {"predictions": [{"label", "confidence"}, …top 5], "clip_id"}
    GET  /                 JSON: the service and its endpoints; a browser (Accept: text/html) gets
                           the results page (`api/static/index.html`, or a hook set with `set_html_page`)

and two job input kinds for `POST /v1/jobs` with model `vjepa2`:

    {"input": {"video": "s3://…" | "file:///…"}}  or multipart `file=@clip.mp4`, `kind=video`
        a whole video: decoded on a worker, cut into clips (`params.stride`, `params.frame_step`),
        classified in batches with everyone else's clips; a timeline JSON is written to storage
    {"input": {"frames": [...], "width", "height", "format"}}
        one or more clips sent by a streaming consumer; returns at once (poll or `callback_url`)

A frame is raw pixels (width*height*3 bytes in `format` order) or an encoded JPEG/PNG of
that size. Wrong frame counts, sizes or undecodable frames answer 422 with the reason.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from redis.exceptions import RedisError

from api.body import read_body
from api.deps import HubDep, SettingsDep, StoreDep, TenantDep
from api.hub import Hub
from api.routes.jobs import register_input_kind
from api.routes.sync import SyncInputs, inline_or_staged, raise_failed, sync_timeout, untrained_headers
from storage.blob import BlobStore
from tasks import clips as clipc
from tasks import keys
from tasks.errors import PayloadTooLarge, Unprocessable, UnsupportedMediaType
from tasks.inputs import check_input_uri, stage_key
from tasks.models import MODELS
from tasks.settings import Settings
from tasks.wire import build_message

router = APIRouter(tags=["V-JEPA 2 video classification"])
MODEL = "vjepa2"
STATIC_INDEX = Path(__file__).resolve().parents[1] / "static" / "index.html"

HtmlPage = Callable[[Request], Awaitable[Response | None]]
_html_page: HtmlPage | None = None


def set_html_page(hook: HtmlPage | None) -> None:
    """Let another module serve the browser's page at `/` (return None to fall through)."""
    global _html_page
    _html_page = hook


def _per_clip(hub: Hub, settings: Settings) -> int:
    """Frames per clip as the live workers' checkpoint has it (the setting, before any registers)."""
    for w in hub.live(MODEL):
        n = w.info.get("frames_per_clip")
        if isinstance(n, int) and n > 0:
            return n
    return settings.vjepa2_frames_per_clip


def _top_k(params: dict[str, Any], settings: Settings) -> int:
    k = params.get("top_k", settings.vjepa2_top_k)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 1000:
        raise Unprocessable("params.top_k must be an integer between 1 and 1000")
    return k


def _int_param(params: dict[str, Any], name: str, default: int, hi: int) -> int:
    v = params.get(name, default)
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= hi:
        raise Unprocessable(f"params.{name} must be an integer between 1 and {hi}")
    return v


# ---------------------------------------------------------------- POST /api/v1/infer
@router.post(
    "/api/v1/infer",
    summary="Classify one clip of 16 frames; top-5 labels",
    responses={200: {"content": {"application/json": {"example": {"predictions": [{"label": "bowling", "confidence": 0.95}], "clip_id": "uuid"}}}}, 422: {"description": "wrong frame count, size mismatch or undecodable frame"}},
)
async def infer(request: Request, settings: SettingsDep, hub: HubDep, store: StoreDep, tenant: TenantDep) -> JSONResponse:
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype not in ("application/json", "text/json", ""):
        raise UnsupportedMediaType("POST /api/v1/infer takes a JSON body: {\"frames\": [...], \"width\", \"height\", \"format\"}")
    timeout = sync_timeout(request, settings)
    hub.admit(MODEL)
    body = await read_body(request, settings.max_body_bytes)
    try:
        req = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise Unprocessable("the body is not JSON") from None
    if not isinstance(req, dict):
        raise Unprocessable("the body must be a JSON object with frames, width, height and format")
    frames, w, h, fmt = clipc.check_frames(req.get("frames"), req.get("width"), req.get("height"), req.get("format", "BGR"), per_clip=_per_clip(hub, settings), max_pixels=settings.max_image_pixels)
    job_id = uuid.uuid4().hex
    ins = SyncInputs(settings, store, tenant)
    inp = await ins.add(clipc.pack_clip(frames, w, h, fmt), job_id, "clip")
    q = hub.new_request(MODEL, tenant=tenant, kind="sync", params={"top_k": settings.vjepa2_top_k}, fmt="png", timeout_s=timeout, inp=inp, job_id=job_id, reply=True)
    (reply,) = await ins.run(hub, [q], timeout)
    if reply["status"] != "succeeded":
        raise_failed(reply)
    res = reply["result"]
    t = res.get("timing", {})
    headers = {"X-Job-Id": job_id, "X-Queue-Ms": str(t.get("queue_ms", "")), "X-Model-Ms": str(t.get("model_ms", "")), "X-Batch-Size": str(t.get("batch_size", "")), "X-Worker": str(res.get("worker", "")), **untrained_headers(res)}
    return JSONResponse({"predictions": res["meta"]["predictions"], "clip_id": str(uuid.UUID(job_id))}, headers=headers)


# ---------------------------------------------------------------- GET /
def _wants_html(accept: str) -> bool:
    """True when the client ranks text/html above application/json (a browser does)."""
    q: dict[str, float] = {}
    for part in accept.split(","):
        bits = [b.strip() for b in part.split(";")]
        if not bits[0]:
            continue
        weight = 1.0
        for b in bits[1:]:
            if b.startswith("q="):
                try:
                    weight = float(b[2:])
                except ValueError:
                    weight = 0.0
        q[bits[0].lower()] = max(weight, q.get(bits[0].lower(), 0.0))
    html = q.get("text/html", q.get("text/*", 0.0))
    json = q.get("application/json", q.get("application/*", q.get("*/*", 0.0)))
    return html > 0 and html > json


def service_info(request: Request) -> dict[str, Any]:
    app = request.app
    endpoints: dict[str, str] = {}
    for path, ops in app.openapi().get("paths", {}).items():  # every router's routes, as /docs lists them
        for method, op in ops.items():
            endpoints[f"{method.upper()} {path}"] = op.get("summary") or (op.get("description") or "").strip().split("\n")[0]
    return {
        "service": app.title,
        "version": app.version,
        "description": app.description,
        "models": {name: spec.description for name, spec in MODELS.items()},
        "endpoints": endpoints,
        "docs": "/docs",
        "openapi": "/openapi.json",
    }


@router.get("/", summary="Service information and available endpoints (a browser gets the results page)", response_model=None)
async def index(request: Request) -> Response:
    if _wants_html(request.headers.get("accept", "")):
        if _html_page is not None:
            page = await _html_page(request)
            if page is not None:
                return page
        if STATIC_INDEX.is_file():
            return FileResponse(STATIC_INDEX, media_type="text/html")
        info = service_info(request)
        items = "".join(f"<li><code>{k}</code> — {v}</li>" for k, v in info["endpoints"].items())
        return HTMLResponse(f"<!doctype html><meta charset=utf-8><title>{info['service']}</title><h1>{info['service']} {info['version']}</h1><p>{info['description']}</p><ul>{items}</ul><p><a href=/docs>API docs</a></p>")
    return JSONResponse(service_info(request))


# ---------------------------------------------------------------- jobs: video and frames
def _check_model(model: str, kind: str) -> None:
    if MODELS[model].family != "vjepa2":
        raise Unprocessable(f"input.{kind} is for model vjepa2, not {model!r}")


async def _enqueue(hub: Hub, settings: Settings, doc: dict[str, Any], state: dict[str, Any], children: list[Any], first_chunk: bool) -> None:
    ttl = settings.result_ttl_seconds
    pipe = hub.redis.pipeline(transaction=False)
    clipc.queue_parent(pipe, doc, state, ttl)
    clipc.queue_children(pipe, children, ttl)
    if first_chunk:
        q = keys.shared_queue(MODEL)
        pipe.lpush(q, build_message(clipc.TASK_VIDEO, f"{doc['id']}:0", {"job_id": doc["id"], "chunk": 0, "first_clip": 0, "start_frame": 0, "start_pts": None}, q))
    try:
        await pipe.execute()
    except (RedisError, OSError) as e:
        raise hub.redis_failed(e) from None


async def _submit_video(*, hub: Hub, settings: Settings, store: BlobStore, tenant: str, job_id: str, model: str, input: dict[str, Any], params: dict[str, Any], callback_url: str | None, upload: Any = None) -> dict[str, Any]:
    _check_model(model, "video")
    stride = _int_param(params, "stride", settings.clip_stride, 10_000)
    step = _int_param(params, "frame_step", 1, 1000)
    top_k = _top_k(params, settings)
    if upload is not None:
        hub.admit(MODEL)  # 503 from memory before the upload is copied to storage
        key = stage_key(tenant, job_id, "video")
        if isinstance(upload, (bytes, bytearray)):
            if len(upload) > settings.max_video_bytes:
                raise PayloadTooLarge(f"the video is over {settings.max_video_bytes} bytes (MAX_VIDEO_BYTES)")
            store.put(key, bytes(upload), "application/octet-stream")
            size = len(upload)
        else:  # a multipart file part, counted while it arrived and spooled to disk by Starlette: copied to storage in chunks
            if (getattr(upload, "size", None) or 0) > settings.max_video_bytes:
                raise PayloadTooLarge(f"the video is over {settings.max_video_bytes} bytes (MAX_VIDEO_BYTES)")
            size = await asyncio.to_thread(store.put_stream, key, getattr(upload, "file", upload), "application/octet-stream")
        uri = f"key:{key}"
        summary: dict[str, Any] = {"kind": "video", "bytes": size, "filename": input.get("filename")}
    else:
        uri = input.get("video")
        if not isinstance(uri, str) or not uri:
            raise Unprocessable("input.video must be an s3:// or file:// URI (or upload the file as multipart with kind=video)")
        check_input_uri(uri, tenant, settings)
        hub.admit(MODEL)  # the decode task is one message on the shared queue
        summary = {"kind": "video", "uri": uri}
    now = time.time()
    doc = {"id": job_id, "model": model, "kind": "job", "tenant": tenant, "created_at": now, "params": params, "input": summary, "callback_url": callback_url}
    state = {
        "kind": "video", "uri": uri, "tenant": tenant, "stride": stride, "frame_step": step, "top_k": top_k,
        "per_clip": _per_clip(hub, settings), "deadline": now + settings.result_ttl_seconds, "total": -1, "emitted": 0, "frames": 0,
    }
    await _enqueue(hub, settings, doc, state, [], first_chunk=True)
    return doc


async def _submit_frames(*, hub: Hub, settings: Settings, store: BlobStore, tenant: str, job_id: str, model: str, input: dict[str, Any], params: dict[str, Any], callback_url: str | None, upload: Any = None) -> dict[str, Any]:
    _check_model(model, "frames")
    if upload is not None:
        raise Unprocessable("frames jobs are JSON: {\"input\": {\"frames\": [...], \"width\", \"height\", \"format\"}}")
    per = _per_clip(hub, settings)
    top_k = _top_k(params, settings)
    frames, w, h, fmt = clipc.check_frames(input.get("frames"), input.get("width"), input.get("height"), input.get("format", "BGR"), per_clip=per, max_pixels=settings.max_image_pixels, multiple=True)
    fps = input.get("fps")
    if fps is not None and (not isinstance(fps, (int, float)) or isinstance(fps, bool) or not 0 < fps <= 1000):
        raise Unprocessable("input.fps must be a number of frames per second (0 < fps <= 1000)")
    n_clips = len(frames) // per
    # room for one clip, from memory; the whole job is counted at once (before any await), so the
    # next requests see it, but a job is never refused only for having more clips than MAX_QUEUE_DEPTH
    hub.check(MODEL)
    hub.depth[MODEL] = hub.depth.get(MODEL, 0) + n_clips
    children = []
    for i in range(n_clips):
        data = clipc.pack_clip(frames[i * per : (i + 1) * per], w, h, fmt)
        inp, _ = inline_or_staged(data, settings, store, tenant, job_id, f"clip{i}")
        p: dict[str, Any] = {"parent": job_id, "index": i, "f0": i * per, "f1": (i + 1) * per - 1, "top_k": top_k}
        if fps:
            p["t0"], p["t1"] = round(i * per / fps, 6), round((i + 1) * per / fps, 6)
        children.append(hub.new_request(MODEL, tenant=tenant, kind="job", params=p, fmt="png", timeout_s=settings.result_ttl_seconds, inp=inp, job_id=clipc.child_id(job_id, i)))
    now = time.time()
    summary = {"kind": "frames", "frames": len(frames), "clips": n_clips, "width": w, "height": h, "format": fmt}
    doc = {"id": job_id, "model": model, "kind": "job", "tenant": tenant, "created_at": now, "params": params, "input": summary, "callback_url": callback_url, "progress": {"done": 0, "total": n_clips}}
    state = {"kind": "frames", "tenant": tenant, "top_k": top_k, "per_clip": per, "fps": fps or "", "width": w, "height": h, "total": n_clips, "emitted": n_clips, "frames": len(frames)}
    await _enqueue(hub, settings, doc, state, children, first_chunk=False)
    return doc


register_input_kind("video", _submit_video)
register_input_kind("frames", _submit_frames)
