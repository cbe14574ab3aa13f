"""`/health` (every field our source services' clients read) and `/models/info`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import HubDep
from tasks.models import MODELS

router = APIRouter(tags=["operations"])


@router.get("/health", summary="Service health: Redis, live workers and depth per queue")
async def health(hub: HubDep) -> JSONResponse:
    workers = [w for ws in hub.workers.values() for w in ws]
    gpus = {(w.raw.get("host"), w.device) for w in workers if w.device.startswith("cuda")}
    queues = {
        m: {"depth": hub.depth.get(m, 0), "workers": [w.id for w in hub.live(m)]}
        for m in MODELS
        if hub.live(m) or hub.depth.get(m, 0)
    }
    ready = hub.redis_ok and bool(workers)
    mem = hub.memory
    ratio = hub.memory_ratio()
    full = ratio >= hub.settings.redis_memory_warn_ratio
    body: dict[str, Any] = {
        "status": "healthy" if ready and not full else ("degraded" if hub.redis_ok else "unhealthy"),
        "ready": ready,
        "model_loaded": any(w.info.get("warm") for w in workers),
        "redis": hub.redis_ok,
        "gpu_available": bool(gpus),
        "gpu_count": len(gpus),
        "gpu_memory_mb": round(sum(w.gpu_memory_mb for w in workers), 1),
        "queue_size": sum(hub.depth.values()),
        "active_sessions": sum(int(w.raw.get("sessions", 0) or 0) for w in workers),
        "workers": len(workers),
        "queues": queues,
        "redis_memory": {"used_bytes": mem["used"], "maxmemory_bytes": mem["max"], "ratio": round(ratio, 4), "policy": mem["policy"], "warn_ratio": hub.settings.redis_memory_warn_ratio, "high": full},
    }
    return JSONResponse(body, status_code=200 if hub.redis_ok else 503)


@router.get("/ping", summary="A constant answer (liveness of the API process itself)")
async def ping() -> dict[str, bool]:
    return {"ok": True}


def trained_of(ws: list) -> bool | None:
    """A model is untrained if any live worker serves random-init weights (its answers may come from it)."""
    flags = [w.info.get("trained") for w in ws]
    if any(f is False for f in flags):
        return False
    return True if any(f is True for f in flags) else None


@router.get("/models/info", summary="Each model: source, revision, trained, devices, input size, batch settings, warm")
async def models_info(hub: HubDep) -> dict[str, Any]:
    out = {}
    for name, spec in MODELS.items():
        ws = hub.live(name)
        out[name] = {
            "description": spec.description,
            "family": spec.family,
            "live_workers": len(ws),
            "devices": sorted({w.device for w in ws}),
            "warm": any(w.info.get("warm") for w in ws),
            "source": next((w.info.get("source") for w in ws), None),
            "revision": next((w.info.get("revision") for w in ws), None),
            # true: learned weights; false: random-init or tiny (meaningless answers, X-Model-Untrained);
            # null: not a model (echo), or no live worker to say
            "trained": trained_of(ws),
            "input_size": next((w.info.get("input_size") for w in ws), None),
            "max_batch_size": next((w.info.get("max_batch_size") for w in ws), None),
            "batch_timeout_ms": next((w.info.get("batch_timeout_ms") for w in ws), None),
            "queue_depth": hub.depth.get(name, 0),
            "workers": [{"id": w.id, "device": w.device, "in_flight": w.in_flight, "processed": w.processed, **w.info} for w in ws],
        }
    return {"models": out}
