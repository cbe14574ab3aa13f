"""`GET /metrics`: Prometheus text exposition (see api/metrics.py for what is in it)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.deps import HubDep
from api.metrics import exposition, snapshot

router = APIRouter(tags=["operations"])


@router.get("/metrics", summary="Prometheus metrics: requests, queues, timings, batches, workers, webhooks", response_class=Response)
async def metrics(hub: HubDep) -> Response:
    return Response(exposition(await snapshot(hub)), media_type=CONTENT_TYPE_LATEST)
