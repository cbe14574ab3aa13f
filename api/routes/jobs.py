"""Submit-and-poll jobs: `POST /v1/jobs`, `GET /v1/jobs[/{id}[/result]]`, `DELETE /v1/jobs/{id}`.

A job's input is one of several kinds, chosen by the key present in `input`:
`image` (base64) and `uri` here; later modules register more kinds (`shards`,
`video`, `frames`) with `register_input_kind`, so every job keeps the same shape.

Admission: the gate (`api/admission.py`) answers 503 while Redis is away; the model is in
the body, so each kind's submitter asks `hub.admit` (no live worker, queue full: 503 from
memory) once its input is validated and before it writes anything.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from api.body import counted_request, read_body
from api.deps import HubDep, SettingsDep, StoreDep, TenantDep
from api.hub import Hub, new_job_id
from api.routes.sync import inline_or_staged
from storage import codecs
from storage.blob import BlobStore, iter_chunks
from tasks import keys
from tasks.errors import BadRequest, Conflict, Gone, JobNotFound, NotFound, PayloadTooLarge, UnknownModel, Unprocessable, UnsupportedMediaType, shown
from tasks.images import probe
from tasks.inputs import check_input_uri
from tasks.models import MODELS
from tasks.sam3_video import JOB_KIND as VIDEO_JOB_KIND
from tasks.settings import Settings
from tasks.webhooks import check_callback_url

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


class JobIn(BaseModel):
    model: str = Field(description="One of the model names (see /models/info).")
    input: dict[str, Any] = Field(description='{"image": base64} | {"uri": "s3://…|file://…"} | {"shards": [...]} | {"video": …} | {"frames": [...]}')
    params: dict[str, Any] = Field(default_factory=dict, description="Model parameters; `format`: packbits | png | rle.")
    callback_url: str | None = Field(None, description="POSTed the job's status JSON when it finishes (signed).")


class JobAccepted(BaseModel):
    job_id: str
    status: str
    links: dict[str, str]


Submitter = Callable[..., Awaitable[dict[str, Any]]]
_KINDS: dict[str, Submitter] = {}


def register_input_kind(key: str, fn: Submitter) -> None:
    """`fn(hub=, settings=, store=, tenant=, job_id=, model=, input=, params=, callback_url=, upload=)` → job doc extras."""
    _KINDS[key] = fn


def links(job_id: str) -> dict[str, str]:
    return {"self": f"/v1/jobs/{job_id}", "result": f"/v1/jobs/{job_id}/result"}


async def _submit_image(*, hub: Hub, settings: Settings, store: BlobStore, tenant: str, job_id: str, model: str, input: dict[str, Any], params: dict[str, Any], callback_url: str | None, upload: bytes | None = None) -> dict[str, Any]:
    fmt = str(params.get("format", settings.output_format)).lower()
    if fmt not in codecs.FORMATS:
        raise Unprocessable(f"params.format {fmt!r} is not one of {', '.join(codecs.FORMATS)}")
    if upload is not None:
        data = upload
    elif "image" in input:
        try:
            data = base64.b64decode(input["image"], validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise Unprocessable("input.image is not valid base64") from None
    else:
        data = None
    if data is None:
        uri = str(input["uri"])
        check_input_uri(uri, tenant, settings)  # 403: another tenant's prefix, another bucket, a path outside ALLOWED_INPUT_ROOTS
    elif model != "echo":
        probe(data, settings.max_image_pixels)
    hub.admit(model)  # 503 from memory (no live worker, queue full) before anything is written
    if data is not None:
        inp, _ = inline_or_staged(data, settings, store, tenant, job_id)
        summary = {"kind": "image", "bytes": len(data)}
    else:
        inp = {"uri": uri}
        summary = {"kind": "uri", "uri": uri}
    q = hub.new_request(model, tenant=tenant, kind="job", params={k: v for k, v in params.items() if k != "format"}, fmt=fmt, timeout_s=settings.result_ttl_seconds, inp=inp, job_id=job_id, write_result_json=True)
    doc = {"id": job_id, "model": model, "kind": "job", "tenant": tenant, "created_at": q.created, "params": params, "input": summary, "callback_url": callback_url}
    await hub.submit([q], docs=[doc])
    return doc


register_input_kind("image", _submit_image)
register_input_kind("uri", _submit_image)


async def _parse(request: Request, settings: Settings) -> tuple[JobIn, Any]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        raw = await read_body(request, settings.max_body_bytes)
        try:
            return JobIn.model_validate_json(raw), None
        except ValueError as e:
            raise Unprocessable(f"invalid job: {e}") from None
    if ctype == "multipart/form-data":
        # Starlette spools file parts to disk with no size limit: count the body while it
        # streams (413 past MAX_BODY_BYTES, or MAX_SHARD_UPLOAD_BYTES for a shard upload,
        # MAX_VIDEO_BYTES for a video); a gzip-encoded body is read through the capped gunzip and replayed
        if request.headers.get("content-encoding", "identity").strip().lower() in ("identity", ""):
            counted = counted_request(request, settings.max_body_bytes, settings.max_shard_upload_bytes, settings.max_video_bytes)
            form = await counted.form(max_files=1, max_fields=8, max_part_size=settings.max_body_bytes)
        else:
            raw = await read_body(request, settings.max_body_bytes)
            form = await _replay(request, raw).form(max_files=1, max_fields=8, max_part_size=settings.max_body_bytes)
        up = form.get("file")
        if up is None or isinstance(up, str):
            raise Unprocessable("multipart jobs need a `file` part")
        try:
            params = orjson.loads(form.get("params") or "{}")
        except orjson.JSONDecodeError:
            raise Unprocessable("the `params` part is not valid JSON") from None
        kind = str(form.get("kind") or "image")
        if kind not in FORM_KINDS:
            raise Unprocessable(f"kind {shown(kind)} is not one of {', '.join(FORM_KINDS)} (a multipart job uploads one image, one WebDataset shard or one video)")
        if kind == "shard" or (kind == "image" and (up.filename or "").lower().endswith((".tar", ".tar.gz", ".tgz"))):
            # a WebDataset shard: streamed to storage by api/routes/shards.py, never read whole
            return JobIn(model=str(form.get("model") or ""), input={"shards": [], "upload": up.filename or "shard.tar"}, params=params, callback_url=form.get("callback_url") or None), up
        if kind == "video":  # streamed to storage by api/routes/vjepa2.py from Starlette's spool, never read whole
            return JobIn(model=str(form.get("model") or ""), input={"video": True, "filename": up.filename}, params=params, callback_url=form.get("callback_url") or None), up
        data = await up.read(settings.max_body_bytes + 1)
        if len(data) > settings.max_body_bytes:
            raise PayloadTooLarge(f"the file is over {settings.max_body_bytes} bytes")
        return JobIn(model=str(form.get("model") or ""), input={kind: True, "filename": up.filename}, params=params, callback_url=form.get("callback_url") or None), data
    raise UnsupportedMediaType("POST /v1/jobs takes application/json or multipart/form-data")


def _replay(request: Request, body: bytes) -> Request:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive)


FORM_KINDS = ("image", "shard", "video")


def _non_finite(v: Any, path: str, depth: int = 0) -> str | None:
    """The path of the first NaN or infinite number in `v` (JSON's NaN, Infinity, 1e309), or None."""
    if isinstance(v, float):
        return None if math.isfinite(v) else path
    if depth > 64:
        return None  # orjson refuses deeper nesting below
    if isinstance(v, dict):
        return next((p for k, x in v.items() if (p := _non_finite(x, f"{path}.{k}", depth + 1))), None)
    if isinstance(v, list):
        return next((p for i, x in enumerate(v) if (p := _non_finite(x, f"{path}[{i}]", depth + 1))), None)
    return None


def check_params(params: dict[str, Any], settings: Settings) -> None:
    """413 over MAX_PARAMS_BYTES; 422 for what the queue message cannot carry (integers past 64 bits)
    or would change: NaN and infinities (JSON has neither; orjson would store them as null)."""
    bad = _non_finite(params, "params")
    if bad:
        raise Unprocessable(f"{shown(bad)} is not a finite number (NaN, Infinity and numbers past 1.8e308 are refused: they would be stored as null)")
    try:
        n = len(orjson.dumps(params))
    except TypeError as e:
        raise Unprocessable(f"params cannot be sent to a worker: {e}") from None
    if n > settings.max_params_bytes:
        raise PayloadTooLarge(f"params are {n} bytes of JSON; the limit is {settings.max_params_bytes} (MAX_PARAMS_BYTES)")


# the body is read by hand (capped, gzip, multipart), so its schema is declared here for the docs and for fuzzing
_JOB_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {**JobIn.model_json_schema(), "properties": {**JobIn.model_json_schema()["properties"], "model": {"type": "string", "enum": list(MODELS)}}},
                "example": {"model": "textmask", "input": {"image": "<base64 image>"}, "params": {"format": "png"}},
            },
            "multipart/form-data": {"schema": {"type": "object", "required": ["model", "file"], "properties": {"model": {"type": "string"}, "file": {"type": "string", "format": "binary"}, "params": {"type": "string", "description": "JSON object"}, "kind": {"type": "string"}, "callback_url": {"type": "string"}}}},
        },
    }
}


@router.post("", status_code=202, response_model=JobAccepted, summary="Submit a job", openapi_extra=_JOB_BODY)
async def submit_job(request: Request, settings: SettingsDep, hub: HubDep, store: StoreDep, tenant: TenantDep, idempotency_key: str | None = Header(None, max_length=200)) -> JSONResponse:
    job, upload = await _parse(request, settings)
    if job.model not in MODELS:
        raise UnknownModel(f"unknown model {job.model!r}; known: {', '.join(MODELS)}")
    kind = next((k for k in _KINDS if k in job.input), None)
    if kind is None:
        raise Unprocessable(f"input must have one of {sorted(_KINDS)}")
    takes = MODELS[job.model].jobs  # its ModelSpec's job kinds
    if kind not in takes:
        raise Unprocessable(f"input.{kind} is not a job input of model {job.model!r}; it takes {', '.join(f'input.{k}' for k in takes) or 'no jobs'}")
    if not isinstance(job.params, dict):
        raise Unprocessable("params must be an object")
    check_params(job.params, settings)
    if job.callback_url is not None:
        check_callback_url(job.callback_url, settings)  # 422 unless WEBHOOK_SECRET is set and WEBHOOK_ALLOWED_HOSTS admits it
    job_id = new_job_id()
    if idempotency_key:
        ik = keys.idempotency(tenant, idempotency_key)
        if not await hub.redis.set(ik, job_id, nx=True, ex=settings.result_ttl_seconds):
            existing = (await hub.redis.get(ik) or b"").decode()
            rec = await hub.get_job(existing) if existing else None
            if rec:
                return JSONResponse({"job_id": existing, "status": rec["status"], "links": links(existing)}, status_code=200, headers={"Idempotent-Replay": "true"})
            await hub.redis.set(ik, job_id, ex=settings.result_ttl_seconds)
    await _KINDS[kind](hub=hub, settings=settings, store=store, tenant=tenant, job_id=job_id, model=job.model, input=job.input, params=job.params, callback_url=job.callback_url, upload=upload)
    return JSONResponse({"job_id": job_id, "status": "queued", "links": links(job_id)}, status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})


async def load_job(hub: Hub, job_id: str, tenant: str) -> dict[str, Any]:
    rec = await hub.get_job(job_id)
    if rec is None or rec["tenant"] != tenant:
        owner = await hub.tombstone(job_id)
        if rec is None and owner == tenant:
            return {"job_id": job_id, "status": "expired", "error": None, "result": None, "expired": True}
        raise JobNotFound(
            f"no job {shown(job_id)}: unknown or expired (a sync request answered in time is kept {hub.settings.sync_result_ttl_s} s, SYNC_RESULT_TTL_S; "
            f"a job {hub.settings.result_ttl_seconds} s, RESULT_TTL_SECONDS, then answers `expired` for 7 more days)"
        )
    return rec


def render(rec: dict[str, Any], store: BlobStore, settings: Settings) -> dict[str, Any]:
    if rec.get("expired"):
        return {"job_id": rec["job_id"], "status": "expired", "links": links(rec["job_id"])}
    out = {k: v for k, v in rec.items() if k not in ("tenant",)}
    out["links"] = links(rec["job_id"])
    res = rec.get("result")
    if res and res.get("outputs"):
        for o in res["outputs"]:
            if o.get("inline"):  # returned to its sync call only (STORE_SYNC_RESULTS=false): nothing to fetch
                continue
            url = store.presign(o["path"], min(settings.result_ttl_seconds, settings.result_url_ttl_s))
            o["url"] = url or f"/v1/jobs/{rec['job_id']}/result?key={o['key']}"
    if rec["status"] in ("queued", "running") and rec.get("started_at") is None:
        out["queue_position"] = None
    return out


async def fail_orphaned(hub: Hub, settings: Settings, rec: dict[str, Any]) -> dict[str, Any]:
    """A video-propagate job runs on the one worker holding its session and cannot move: once
    that worker is gone (its registration expired) the job is failed with 410's code, rather
    than showing `running` until its record expires."""
    if rec.get("kind") != VIDEO_JOB_KIND or rec["status"] not in ("queued", "running") or not rec.get("worker") or not hub.redis_ok:
        return rec
    if any(w.id == rec["worker"] for w in hub.live(settings.video_session_model)):
        return rec
    await hub.jobs.fail(rec["job_id"], Gone(f"the worker {rec['worker']} holding this job's video session is gone (it died or was stopped); start a new session and propagate again"))
    return await hub.get_job(rec["job_id"]) or rec


@router.get("/{job_id}", summary="Job status, progress and outputs")
async def get_job(job_id: str, hub: HubDep, store: StoreDep, settings: SettingsDep, tenant: TenantDep) -> dict[str, Any]:
    return render(await fail_orphaned(hub, settings, await load_job(hub, job_id, tenant)), store, settings)


@router.get("/{job_id}/result", summary="Stream a job's output (`?key=` picks one)")
async def get_result(job_id: str, hub: HubDep, store: StoreDep, tenant: TenantDep, key: str | None = Query(None, max_length=200)) -> Response:
    rec = await load_job(hub, job_id, tenant)
    if rec["status"] != "succeeded":
        raise Conflict(f"job {job_id} is {rec['status']}; its result is available once it has succeeded")
    outs = (rec.get("result") or {}).get("outputs") or []
    if not outs:
        return JSONResponse(rec.get("result") or {})
    if key is None and len(outs) > 1:
        raise BadRequest(f"this job has {len(outs)} outputs; pick one with ?key= ({', '.join(o['key'] for o in outs)})")
    o = next((o for o in outs if key in (None, o["key"])), None)
    if o is None:
        raise NotFound(f"job {job_id} has no output {key!r}; it has {', '.join(x['key'] for x in outs)}")
    if o.get("inline"):
        raise Gone(f"job {job_id}'s output {o['key']!r} was returned to its sync call and not stored (STORE_SYNC_RESULTS=false)")
    f = store.open(o["path"])
    return StreamingResponse(iter_chunks(f), media_type=o.get("content_type") or "application/octet-stream", headers={"X-Mask-Format": o["format"], "Content-Disposition": f'attachment; filename="{o["path"].rsplit("/", 1)[-1]}"'})


@router.get("", summary="List jobs, newest first")
async def list_jobs(hub: HubDep, store: StoreDep, settings: SettingsDep, tenant: TenantDep, limit: int = Query(20, ge=1, le=200), offset: int = Query(0, ge=0, le=1_000_000)) -> dict[str, Any]:
    ids = [x.decode() for x in await hub.redis.zrevrange(keys.jobs_index(tenant), offset, offset + limit - 1)]
    total = await hub.redis.zcard(keys.jobs_index(tenant))
    pipe = hub.redis.pipeline(transaction=False)
    for i in ids:
        pipe.hgetall(keys.job(i))
    raws = await pipe.execute() if ids else []
    from tasks.jobstore import parse_record

    jobs = []
    for i, raw in zip(ids, raws, strict=True):
        if raw:
            jobs.append(render(parse_record(raw), store, settings))
        else:
            jobs.append({"job_id": i, "status": "expired", "links": links(i)})
    nxt = offset + limit if offset + limit < total else None
    return {"jobs": jobs, "total": total, "offset": offset, "limit": limit, "next_offset": nxt}


@router.delete("/{job_id}", summary="Cancel a job")
async def cancel_job(job_id: str, hub: HubDep, tenant: TenantDep) -> dict[str, Any]:
    rec = await load_job(hub, job_id, tenant)
    if rec.get("expired"):
        return {"job_id": job_id, "status": "expired"}
    status = await hub.cancel(job_id)
    return {"job_id": job_id, "status": status}
