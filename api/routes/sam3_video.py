"""SAM3 video sessions, the source services' contract (`tasks.sam3_video`).

    POST   /api/v1/video/session/start            {"video_path"|"resource_path", "session_id"?}
    POST   /api/v1/video/session/upload           multipart `file` (mp4/avi/mov/mkv/webm/flv), `session_id`?
    POST   /api/v1/video/session/{id}/prompt      {"frame_index", "prompts": [text | box | point, ...], "obj_id"?}
    POST   /api/v1/video/prompt/add               {"session_id", "frame_index", "text"}
    POST   /api/v1/video/session/{id}/propagate   {"direction", "start_frame_index", "max_frames", "stream": false, "async"?: true}
    POST   /api/v1/video/propagate                {"session_id", ...}
    GET    /api/v1/video/session/{id}/status
    DELETE /api/v1/video/session/{id}/object/{obj_id}
    POST   /api/v1/video/session/{id}/reset
    DELETE /api/v1/video/session/{id}
    GET    /api/v1/video/sessions

Session ids are per tenant (`tf:session:<tenant>:<id>`): another tenant's id is simply free,
and a tenant holds at most MAX_SESSIONS_PER_TENANT sessions (429 `quota_exceeded` past it).

Affinity: a session is started on the live worker of VIDEO_SESSION_MODEL holding the
fewest sessions (its registration hash's `sessions`); `tf:session:<tenant>:<id>` records that
worker's private queue (TTL SESSION_TTL_SECONDS, renewed by every call) and every later
call is a `trifecta.video` task on that queue, answered on this API's reply channel.
A session whose worker is gone answers 410.

`"async": true` on a propagate makes it a job: 202 with a job id at once, the job record
written here (kind `video-propagate`, in the tenant's `/v1/jobs` list) and the call sent to
the session's worker without waiting; `GET /v1/jobs/{id}` shows `progress` (frames done of
total) and, once it has succeeded, one output per frame (its objects as JSON in storage).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import PurePosixPath
from typing import Any

import orjson
from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse

from api.body import counted_request, read_body
from api.deps import HubDep, SettingsDep, StoreDep, TenantDep
from api.hub import Hub, new_job_id
from api.routes.jobs import links
from storage.blob import BlobStore, open_store
from tasks import jobstore
from tasks.errors import (
    BadRequest,
    Conflict,
    Gone,
    NotFound,
    NoWorker,
    Overloaded,
    PayloadTooLarge,
    QuotaExceeded,
    SyncTimeout,
    TrifectaError,
    Unprocessable,
    UnsupportedMediaType,
    from_code,
    shown,
    translate,
)
from tasks.inputs import STAGED, local_path
from tasks.sam3_video import CLAIM_LUA, DIRECTIONS, JOB_KIND, TASK_VIDEO, VIDEO_EXTENSIONS, check_session_id, int_field, parse_prompts, session_key, tenant_sessions_key
from tasks.settings import Settings
from tasks.webhooks import check_callback_url
from tasks.wire import build_message

router = APIRouter(prefix="/api/v1/video", tags=["sam3 video"])


# ---------------------------------------------------------------- helpers
async def _json(request: Request, settings: Settings) -> dict[str, Any]:
    raw = await read_body(request, settings.max_body_bytes)
    try:
        body = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError:
        raise Unprocessable("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise Unprocessable("the body must be a JSON object")
    return body


def _stale_after(settings: Settings) -> float:
    return 2 * settings.worker_heartbeat_s + 1


def _session_workers(hub: Hub, settings: Settings) -> list[Any]:
    now = time.time()
    return [w for w in hub.live(settings.video_session_model) if "sessions" in w.raw and len(w.queues) > 1 and now - w.heartbeat <= _stale_after(settings)]


def _pick_worker(hub: Hub, settings: Settings) -> Any:
    ws = _session_workers(hub, settings)
    if not ws:
        raise NoWorker(f"no live worker holds video sessions; start one with `trifecta worker --model {settings.video_session_model}`", headers={"Retry-After": "5"})
    cap = settings.max_sessions_per_worker
    free = [w for w in ws if int(w.raw.get("sessions", 0)) < int(w.raw.get("max_sessions", cap))]
    if not free:
        raise Overloaded(f"every video worker holds its MAX_SESSIONS_PER_WORKER={cap} sessions; close a session or retry later", headers={"Retry-After": "10"})
    return min(free, key=lambda w: (int(w.raw.get("sessions", 0)), w.in_flight, w.id))


async def _call(hub: Hub, queue: str, op: str, sid: str, tenant: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One `trifecta.video` task on `queue`; its reply (on hub.channel) or the error it carried."""
    if op != "close":  # 503 from memory while the session's worker has a full queue (a close frees a slot: never refused)
        hub.admit(hub.settings.video_session_model, queue=queue)
    cid = uuid.uuid4().hex
    fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    hub.waiters[cid] = fut
    call = {"id": cid, "op": op, "session_id": sid, "tenant": tenant, "args": args, "reply": hub.channel}
    try:
        await hub.redis.lpush(hub.qkeys.queue(queue), build_message(TASK_VIDEO, cid, {"call": call}, queue))
        try:
            reply = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise SyncTimeout(f"session {sid}: no answer to {op!r} within {timeout:g} s (SESSION_CALL_TIMEOUT_S)") from None
    finally:
        hub.waiters.pop(cid, None)
    if reply.get("status") != "succeeded":
        err = reply.get("error") or {}
        code, msg = err.get("code", "internal"), err.get("message", "the session call failed")
        if code == "overloaded":
            raise Overloaded(msg, headers={"Retry-After": "10"})
        raise from_code(code, msg)
    return reply["result"]


async def _record(hub: Hub, sid: str, tenant: str) -> dict[str, str]:
    raw = await hub.redis.hgetall(session_key(tenant, check_session_id(sid)))
    rec = {k.decode(): v.decode() for k, v in raw.items()}
    if not rec or rec.get("tenant") != tenant:
        raise NotFound(f"no session {sid} (never started, closed, or expired after SESSION_TTL_SECONDS idle)")
    return rec


async def _forget(hub: Hub, store: BlobStore, tenant: str, sid: str, rec: dict[str, str]) -> None:
    await hub.redis.delete(session_key(tenant, sid))
    await hub.redis.srem(tenant_sessions_key(tenant), sid)
    if rec.get("job"):  # a propagate job of this session that never finished (its worker died): fail it, don't leave it running
        await hub.jobs.fail(rec["job"], Gone(f"session {sid} was closed or its worker {rec.get('worker')} is gone before this propagate job finished"))
    if rec.get("upload"):
        await asyncio.to_thread(store.delete_prefix, rec["upload"])


async def _live_record(hub: Hub, settings: Settings, store: BlobStore, tenant: str, sid: str) -> dict[str, str]:
    """The session's record, its worker alive; 404 for no such session, 410 when its worker is gone."""
    rec = await _record(hub, sid, tenant)
    alive = {w.id: w for w in hub.live(settings.video_session_model)}
    w = alive.get(rec["worker"])
    if w is None or time.time() - w.heartbeat > _stale_after(settings):
        await _forget(hub, store, tenant, sid, rec)
        raise Gone(f"session {sid} lived on worker {rec['worker']}, which is gone; its frames and tracking state are lost — start a new session")
    return rec


async def _session_call(hub: Hub, settings: Settings, store: BlobStore, tenant: str, sid: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
    """A call on an open session, on its own worker; 410 when that worker is gone."""
    rec = await _live_record(hub, settings, store, tenant, sid)
    await hub.redis.expire(session_key(tenant, sid), int(settings.session_ttl_seconds) + 5)
    try:
        return await _call(hub, rec["queue"], op, sid, tenant, args, settings.session_call_timeout_s)
    except Gone:
        await _forget(hub, store, tenant, sid, rec)
        raise


async def _start(hub: Hub, settings: Settings, store: BlobStore, tenant: str, sid: str, uri: str, upload: str | None) -> dict[str, Any]:
    w = _pick_worker(hub, settings)
    w.raw["sessions"] = str(int(w.raw.get("sessions", 0)) + 1)  # counted at once (as hub.admit does); the next poll reads the worker's own count
    rec = {"worker": w.id, "queue": w.queues[1], "tenant": tenant, "created": str(time.time()), "source": uri}
    if upload:
        rec["upload"] = upload
    k = session_key(tenant, sid)
    claimed = await hub.redis.eval(CLAIM_LUA, 2, tenant_sessions_key(tenant), k, sid, settings.max_sessions_per_tenant, w.id, session_key(tenant, ""), int(settings.session_ttl_seconds) * 2 + 60)
    if claimed == -1:
        raise Conflict(f"session {sid} already exists")
    if claimed == -2:
        raise _over_quota(tenant, settings)
    pipe = hub.redis.pipeline(transaction=True)
    pipe.hset(k, mapping=rec)
    pipe.expire(k, int(settings.session_ttl_seconds) + 5)
    await pipe.execute()
    try:
        res = await _call(hub, w.queues[1], "start", sid, tenant, {"uri": uri, "upload": upload}, settings.session_call_timeout_s)
    except BaseException:
        await _forget(hub, store, tenant, sid, {"upload": upload or ""})
        raise
    return {"session_id": sid, "video_info": res["video_info"], "status": res.get("status", "ready"), "worker": res.get("worker", w.id)}


def _over_quota(tenant: str, settings: Settings) -> QuotaExceeded:
    n = settings.max_sessions_per_tenant
    return QuotaExceeded(f"tenant {tenant!r} holds its MAX_SESSIONS_PER_TENANT={n} open video sessions; close one (DELETE /api/v1/video/session/{{id}}) or retry later", headers={"Retry-After": "10"})


async def _check_quota(hub: Hub, settings: Settings, tenant: str) -> None:
    """429 before an upload is read when the tenant already holds its quota (`_start` checks again, atomically)."""
    sids = [x.decode() for x in await hub.redis.smembers(tenant_sessions_key(tenant))]
    if len(sids) < settings.max_sessions_per_tenant:
        return
    pipe = hub.redis.pipeline(transaction=False)
    for sid in sids:
        pipe.exists(session_key(tenant, sid))
    if sum(await pipe.execute()) >= settings.max_sessions_per_tenant:
        raise _over_quota(tenant, settings)


def _new_sid(body: dict[str, Any]) -> str:
    sid = body.get("session_id")
    return str(uuid.uuid4()) if sid in (None, "") else check_session_id(sid)


# ---------------------------------------------------------------- session lifecycle
@router.post("/session/start", summary="Start a video session from a server path (under ALLOWED_INPUT_ROOTS)")
async def start_session(request: Request, settings: SettingsDep, hub: HubDep, store: StoreDep, tenant: TenantDep) -> JSONResponse:
    body = await _json(request, settings)
    path = body.get("video_path") or body.get("resource_path")
    if not isinstance(path, str) or not path:
        raise Unprocessable("give video_path (or resource_path): a video file on the server, under ALLOWED_INPUT_ROOTS")
    if path.startswith(STAGED) or "://" in path and not path.startswith("file://"):
        raise BadRequest("video_path must be a local path or file:// URI; upload other videos to /api/v1/video/session/upload")
    p = local_path(path, settings)  # 403 outside ALLOWED_INPUT_ROOTS
    if not p.is_file():
        raise BadRequest(f"no video file at {path}")
    return JSONResponse(await _start(hub, settings, store, tenant, _new_sid(body), str(p), None))


@router.post("/session/upload", summary="Upload a video (multipart `file`) and start a session on it")
async def upload_session(request: Request, settings: SettingsDep, hub: HubDep, store: StoreDep, tenant: TenantDep) -> JSONResponse:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise UnsupportedMediaType("POST /api/v1/video/session/upload takes multipart/form-data with a `file` part")
    limit = settings.max_video_bytes
    _pick_worker(hub, settings)  # 503 before reading a large body
    await _check_quota(hub, settings, tenant)  # 429 too
    form = await counted_request(request, limit, limit).form(max_files=1, max_fields=8)
    up = form.get("file")
    if up is None or isinstance(up, str):
        raise Unprocessable("the form needs a `file` part with the video")
    ext = PurePosixPath(up.filename or "").suffix.lower()
    if ext not in VIDEO_EXTENSIONS:
        shown_ext = shown(ext) if ext else "'(no extension)'"
        raise BadRequest(f"unsupported video format {shown_ext}; upload one of {', '.join(e[1:] for e in VIDEO_EXTENSIONS)}")
    raw_sid = form.get("session_id")
    sid = _new_sid({"session_id": raw_sid if isinstance(raw_sid, str) else None})
    prefix = f"{tenant}/videos/{sid}/"
    if await hub.redis.exists(session_key(tenant, sid)):
        raise Conflict(f"session {sid} already exists")
    key = f"{prefix}video{ext}"
    try:
        size = await asyncio.to_thread(store.put_stream, key, up.file, "application/octet-stream")
        if size > limit:
            raise PayloadTooLarge(f"the video is over {limit} bytes (MAX_VIDEO_BYTES)")
        if size == 0:
            raise BadRequest("the uploaded video is empty")
    except BaseException:
        await asyncio.to_thread(store.delete_prefix, prefix)
        raise
    return JSONResponse(await _start(hub, settings, store, tenant, sid, f"{STAGED}{key}", prefix))


@router.get("/session/{session_id}/status", summary="A session's video, prompts, objects and worker")
async def session_status(session_id: str, settings: SettingsDep, hub: HubDep, store: StoreDep, tenant: TenantDep) -> JSONResponse:
    return JSONResponse(await _session_call(hub, settings, store, tenant, session_id, "status", {}))


@router.post("/session/{session_id}/reset", summary="Clear a session's prompts and objects (the frames stay)")
async def reset_session(session_id: str, settings: SettingsDep, hub: HubDep, store: StoreDep, tenant: TenantDep) -> JSONResponse:
    return JSONResponse(await _session_call(hub, settings, store, tenant, session_id, "reset", {}))


@router.delete("/session/{session_id}/object/{obj_id}", summary="Stop tracking one object")
async def remove_object(session_id: str, obj_id: int, settings: SettingsDep, hub: HubDep, store: StoreDep, tenant: TenantDep) -> JSONResponse:
    return JSONResponse(await _session_call(hub, settings, store, tenant, session_id, "remove_object", {"obj_id": obj_id}))


@router.delete("/session/{session_id}", summary="Close a session: frees its worker slot and deletes an uploaded video")
async def close_session(session_id: str, settings: SettingsDep, hub: HubDep, store: StoreDep, tenant: TenantDep) -> JSONResponse:
    rec = await _record(hub, session_id, tenant)
    try:
        res = await _session_call(hub, settings, store, tenant, session_id, "close", {})
    except Gone:
        res = {"session_id": session_id, "closed": True, "worker": rec["worker"], "note": "its worker was already gone"}
    await _forget(hub, store, tenant, session_id, rec)
    return JSONResponse({**res, "upload_deleted": bool(rec.get("upload"))})


@router.get("/sessions", summary="The caller's open sessions")
async def list_sessions(settings: SettingsDep, hub: HubDep, tenant: TenantDep) -> JSONResponse:
    out = []
    alive = {w.id for w in hub.live(settings.video_session_model)}
    sids = sorted(x.decode() for x in await hub.redis.smembers(tenant_sessions_key(tenant)))
    pipe = hub.redis.pipeline(transaction=False)
    for sid in sids:
        pipe.hgetall(session_key(tenant, sid))
    for sid, raw in zip(sids, await pipe.execute() if sids else [], strict=True):
        rec = {a.decode(): b.decode() for a, b in raw.items()}
        if rec.get("tenant") != tenant:  # expired (the set is pruned at the next start)
            continue
        out.append({"session_id": sid, "worker": rec.get("worker"), "created_at": float(rec.get("created", 0)), "uploaded": bool(rec.get("upload")), "worker_alive": rec.get("worker") in alive})
    out.sort(key=lambda s: s["created_at"])
    return JSONResponse({"sessions": out, "count": len(out)})


# ---------------------------------------------------------------- prompts and propagation
def _prompt_args(body: dict[str, Any], raw: Any, settings: Settings) -> dict[str, Any]:
    fi = int_field(body, "frame_index", 0)
    obj_id = int_field(body, "obj_id", None)
    prompt = parse_prompts(raw, max_prompts=settings.max_prompts)  # 422 here, before the queue
    return {"frame_index": fi, "prompts": prompt.wire(), "obj_id": obj_id}


def _prompt_answer(res: dict[str, Any]) -> dict[str, Any]:
    return {k: res[k] for k in ("frame_index", "obj_id", "masks", "boxes", "scores", "obj_ids", "worker") if k in res}


@router.post("/session/{session_id}/prompt", summary="Text prompts (every matching object), or a box and/or points (one object), on one frame")
async def add_prompt(session_id: str, request: Request, settings: SettingsDep, hub: HubDep, store: StoreDep, tenant: TenantDep) -> JSONResponse:
    body = await _json(request, settings)
    res = await _session_call(hub, settings, store, tenant, session_id, "prompt", _prompt_args(body, body.get("prompts"), settings))
    return JSONResponse(_prompt_answer(res))


@router.post("/prompt/add", summary="Add a text prompt on a frame (session id in the body)")
async def add_prompt_flat(request: Request, settings: SettingsDep, hub: HubDep, store: StoreDep, tenant: TenantDep) -> JSONResponse:
    body = await _json(request, settings)
    sid = check_session_id(body.get("session_id"))
    raw = body["prompts"] if "prompts" in body else [{"type": "text", "text": body.get("text")}]
    res = await _session_call(hub, settings, store, tenant, sid, "prompt", _prompt_args(body, raw, settings))
    return JSONResponse({"session_id": sid, **_prompt_answer(res)})


def _propagate_args(body: dict[str, Any]) -> dict[str, Any]:
    direction = body.get("direction", "forward")
    if direction not in DIRECTIONS:
        raise Unprocessable(f"direction must be one of {', '.join(DIRECTIONS)}")
    if body.get("stream"):
        raise Unprocessable("stream: true is served by the WebSocket WS /api/v1/video/ws/propagate/{session_id}; this endpoint answers every frame at once (or, with \"async\": true, as a job)")
    return {"direction": direction, "start_frame_index": int_field(body, "start_frame_index", 0), "max_frames": int_field(body, "max_frames", None, minimum=1)}


def _is_async(body: dict[str, Any]) -> bool:
    v = body.get("async", False)
    if not isinstance(v, bool):
        raise Unprocessable(f"async must be true or false, got {type(v).__name__}")
    return v


async def _propagate(hub: Hub, settings: Settings, store: BlobStore, tenant: str, sid: str, body: dict[str, Any]) -> JSONResponse:
    args = _propagate_args(body)
    if _is_async(body):
        return await _propagate_job(hub, settings, store, tenant, sid, args, body.get("callback_url"))
    res = await _session_call(hub, settings, store, tenant, sid, "propagate", args)
    return JSONResponse({k: res[k] for k in ("session_id", "results", "total_frames", "processing_time_ms", "worker")})


async def _propagate_job(hub: Hub, settings: Settings, store: BlobStore, tenant: str, sid: str, args: dict[str, Any], callback_url: Any) -> JSONResponse:
    """Write the job record, enqueue the call on the session's worker, answer 202 at once (one pipeline)."""
    if callback_url is not None:
        if not isinstance(callback_url, str):
            raise Unprocessable("callback_url must be a string")
        check_callback_url(callback_url, settings)
    rec = await _live_record(hub, settings, store, tenant, sid)
    hub.admit(settings.video_session_model, queue=rec["queue"])  # 503 from memory while its worker's queue is full
    job_id = new_job_id()
    now = time.time()
    doc = {
        "id": job_id, "model": settings.video_session_model, "kind": JOB_KIND, "tenant": tenant, "created_at": now,
        "params": args, "input": {"kind": "video-session", "session_id": sid}, "callback_url": callback_url,
        "progress": {"done": 0, "total": None},
    }
    call = {"id": job_id, "op": "propagate", "session_id": sid, "tenant": tenant, "args": {**args, "job": job_id}, "reply": ""}
    ttl = settings.result_ttl_seconds
    pipe = hub.redis.pipeline(transaction=True)
    jobstore.create(pipe, doc, ttl=ttl, fields={"worker": rec["worker"]})  # the session's worker: a poll finds the job orphaned if it dies
    pipe.hset(session_key(tenant, sid), "job", job_id)
    pipe.expire(session_key(tenant, sid), int(settings.session_ttl_seconds) + 5)
    pipe.lpush(hub.qkeys.queue(rec["queue"]), build_message(TASK_VIDEO, job_id, {"call": call}, rec["queue"]))
    await pipe.execute()
    body = {"job_id": job_id, "status": "queued", "kind": JOB_KIND, "session_id": sid, "worker": rec["worker"], "links": links(job_id)}
    return JSONResponse(body, status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})


@router.post("/session/{session_id}/propagate", summary="Track the prompted objects through the video (`async: true`: as a job)")
async def propagate(session_id: str, request: Request, settings: SettingsDep, hub: HubDep, store: StoreDep, tenant: TenantDep) -> JSONResponse:
    return await _propagate(hub, settings, store, tenant, session_id, await _json(request, settings))


@router.post("/propagate", summary="Track through the video (session id in the body)")
async def propagate_flat(request: Request, settings: SettingsDep, hub: HubDep, store: StoreDep, tenant: TenantDep) -> JSONResponse:
    body = await _json(request, settings)
    return await _propagate(hub, settings, store, tenant, check_session_id(body.get("session_id")), body)


@router.websocket("/ws/propagate/{session_id}")
async def ws_propagate(websocket: WebSocket, session_id: str) -> None:
    """Send `{"direction", "start_frame_index", "max_frames"}` (or nothing within 10 s: forward
    from frame 0); receive `{"type": "frame", "frame_index", "objects"}` per frame as the worker
    finishes it (Redis pub/sub), then `{"type": "complete", "total_frames"}`, or `{"type": "error", "error"}`."""
    await websocket.accept()
    app = websocket.app
    settings: Settings = app.state.settings
    hub: Hub = app.state.hub
    store = open_store(settings.storage_url, settings.s3_endpoint_url)
    tenant = getattr(websocket.state, "tenant", "default")
    pubsub = hub.redis.pubsub(ignore_subscribe_messages=True)
    task: asyncio.Task[dict[str, Any]] | None = None
    try:
        try:
            body = await asyncio.wait_for(websocket.receive_json(), 10)
        except TimeoutError:
            body = {}
        if not isinstance(body, dict):
            raise Unprocessable("send a JSON object: {\"direction\", \"start_frame_index\", \"max_frames\"}")
        args = _propagate_args({**body, "stream": False})
        channel = f"tf:stream:{uuid.uuid4().hex}"
        await pubsub.subscribe(channel)  # before the call: no frame is published unheard
        args["stream"] = channel
        task = asyncio.create_task(_session_call(hub, settings, store, tenant, session_id, "propagate", args))
        grace_until: float | None = None
        while True:
            msg = await pubsub.get_message(timeout=0.25)
            if msg is not None:
                data = orjson.loads(msg["data"])
                await websocket.send_json(data)
                if data.get("type") == "complete":
                    break
                continue
            if task.done():
                task.result()  # raises the call's error
                grace_until = grace_until or time.monotonic() + 2
                if time.monotonic() > grace_until:  # the reply came but the last message was lost: finish anyway
                    await websocket.send_json({"type": "complete", "total_frames": task.result()["total_frames"]})
                    break
    except WebSocketDisconnect:
        return
    except Exception as e:  # noqa: BLE001 - every failure reaches the client as an error message
        err: TrifectaError = translate(e)
        try:
            await websocket.send_json({"type": "error", "error": jobstore.error(err)})
        except (WebSocketDisconnect, RuntimeError):
            return
    finally:
        if task is not None and not task.done():
            task.cancel()
        await pubsub.aclose()
    try:
        await websocket.close()
    except RuntimeError:
        pass
