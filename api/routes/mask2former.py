"""Mask2Former multi-class segmentation, kept from the source service.

    POST /segment          raw image body, `X-Mask: wall` (or `?mask=`) → one PNG mask
    POST /segment-batch    raw image body → {"wall": base64 PNG, "floor", "ceiling", "window"}
                           from ONE inference; `?classes=a,b` / `X-Classes: a,b` / `all` asks for others

Every mask is at the original (EXIF-oriented) image size. Names are the checkpoint's label
names (ADE20K: `wall`, `floor`, `windowpane`, ...; `window` is an alias for `windowpane`);
an unknown name → 422 listing the valid ones, checked against the names the live workers
registered before anything is queued. `X-Model` picks among the configured segmentation
models (the source service's `mask2former_ade20k` is accepted). An image over M2F_MAX_PIXELS
→ 422 saying how to shrink it. The masks also stay in storage under the request's job id
(`X-Job-Id`), like every output.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from api.body import raw_body_type, read_body
from api.deps import HubDep, SettingsDep, StoreDep, TenantDep
from api.hub import Hub, new_job_id
from api.routes.sync import SyncInputs, fetch_output, mask_format, raise_failed, sync_timeout, untrained_headers
from storage import codecs
from storage.blob import BlobStore
from tasks import seglabels
from tasks.errors import UnknownModel, Unprocessable, UnsupportedMediaType
from tasks.images import IMAGE_CONTENT_TYPES, probe
from tasks.models import MODELS
from tasks.settings import Settings

router = APIRouter(tags=["Mask2Former segmentation"])
FAMILY = "mask2former"


def seg_models() -> list[str]:
    return [m for m, spec in MODELS.items() if spec.family == FAMILY]


def model_named(asked: str | None) -> str | None:
    """The segmentation model an `X-Model` value names (the first one when empty), or None."""
    models = seg_models()
    if not asked:
        return models[0] if models else None
    n = asked.strip().lower()
    n = seglabels.MODEL_ALIASES.get(n, n)
    return n if n in models else None


def gate_model(scope: Any) -> str | None:
    """As `pick_model`, for the admission gate (an ASGI scope, before routing); an unknown name is left to the route (its 4xx)."""
    from api.admission import header, query  # here: the gate imports this module while it builds its table

    return model_named(header(scope, b"x-model") or query(scope, "model"))


def pick_model(request: Request) -> str:
    """The model named by `X-Model` (or `?model=`): a configured segmentation model or an alias of one."""
    asked = request.headers.get("x-model") or request.query_params.get("model")
    model = model_named(asked)
    if model is None:
        raise UnknownModel(f"X-Model {asked!r} is not a segmentation model here; use one of {', '.join(seg_models() + sorted(seglabels.MODEL_ALIASES))}")
    return model


def model_labels(hub: Hub, model: str) -> list[str] | None:
    for w in hub.live(model):
        labels = w.info.get("labels")
        if isinstance(labels, list) and labels:
            return [str(x) for x in labels]
    return None


async def _segment(request: Request, settings: Settings, hub: Hub, store: BlobStore, tenant: str, asked: list[str] | str, fmt: str) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]], dict[str, str]]:
    """Run one inference for `asked`; (result, [(name, output)], headers)."""
    model = pick_model(request)
    ctype = raw_body_type(request)
    if ctype not in IMAGE_CONTENT_TYPES:
        raise UnsupportedMediaType(f"Content-Type {ctype!r} is not accepted; send the image bytes as image/jpeg, image/png, image/webp, image/heic or application/octet-stream")
    timeout = sync_timeout(request, settings)
    labels = model_labels(hub, model)
    hub.admit(model)
    if asked != seglabels.ALL and labels is not None:
        seglabels.resolve(asked, labels)  # type: ignore[arg-type]  # 422 before reading the body
    body = await read_body(request, settings.max_body_bytes)
    _, w, h = probe(body, settings.max_image_pixels)
    limit = min(settings.m2f_max_pixels, next((int(x.info["max_pixels"]) for x in hub.live(model) if x.info.get("max_pixels")), settings.m2f_max_pixels))
    if w * h > limit:
        raise Unprocessable(seglabels.too_large_message(w, h, limit))
    job_id = new_job_id()
    ins = SyncInputs(settings, store, tenant)
    q = hub.new_request(model, tenant=tenant, kind="sync", params={"classes": asked}, fmt=fmt, timeout_s=timeout, inp=await ins.add(body, job_id), job_id=job_id, reply=True)
    (reply,) = await ins.run(hub, [q], timeout)
    if reply["status"] != "succeeded":
        raise_failed(reply)
    res = reply["result"]
    by_key = {o["key"]: o for o in res["outputs"]}
    pairs = [(c["name"], by_key[c["key"]]) for c in res["meta"]["classes"]]
    t = res.get("timing", {})
    headers = {"X-Job-Id": job_id, "X-Model": model, "X-Queue-Ms": str(t.get("queue_ms", "")), "X-Model-Ms": str(t.get("model_ms", "")), "X-Worker": str(res.get("worker", "")), "X-Image-Size": f"{res['meta']['size'][1]}x{res['meta']['size'][0]}", **untrained_headers(res)}
    return res, pairs, headers


@router.post(
    "/segment",
    summary="One class mask (X-Mask: wall) as a PNG at the original image size",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, 422: {"description": "unknown class name (the valid ones are listed), or an image too large to segment"}},
)
async def segment(request: Request, settings: SettingsDep, hub: HubDep, store: StoreDep, tenant: TenantDep) -> Response:
    name = request.headers.get("x-mask") or request.query_params.get("mask") or request.query_params.get("classes") or request.headers.get("x-classes") or "wall"
    names = seglabels.parse_names(name)
    if names is None or names == seglabels.ALL or len(names) != 1:
        raise Unprocessable("/segment answers one mask: name one class in X-Mask (use /segment-batch for several)")
    fmt = mask_format(request, settings) if (request.query_params.get("format") or request.headers.get("x-mask-format")) else "png"
    res, pairs, headers = await _segment(request, settings, hub, store, tenant, names, fmt)
    (cname, path) = pairs[0]
    c = res["meta"]["classes"][0]
    return Response(await fetch_output(store, path), media_type=codecs.CONTENT_TYPES[fmt], headers={**headers, "X-Mask": cname, "X-Class-Label": c["label"], "X-Class-Id": str(c["id"]), "X-Mask-Format": fmt})


@router.post(
    "/segment-batch",
    summary="Several class masks from ONE inference: {class: base64 PNG}",
    responses={200: {"content": {"application/json": {"example": {"wall": "iVBORw0…", "floor": "…", "ceiling": "…", "window": "…"}}}}, 422: {"description": "unknown class name (the valid ones are listed), or an image too large to segment"}},
)
async def segment_batch(request: Request, settings: SettingsDep, hub: HubDep, store: StoreDep, tenant: TenantDep) -> JSONResponse:
    asked = seglabels.parse_names(request.query_params.get("classes") or request.headers.get("x-classes"))
    if asked is None:
        asked = list(seglabels.DEFAULT_CLASSES)
    res, pairs, headers = await _segment(request, settings, hub, store, tenant, asked, "png")
    datas = await asyncio.gather(*(fetch_output(store, p) for _, p in pairs))
    body = {name: base64.b64encode(d).decode("ascii") for (name, _), d in zip(pairs, datas, strict=True)}
    return JSONResponse(body, headers={**headers, "X-Classes": ",".join(n for n, _ in pairs)})
