"""The FastAPI application: routers, one error handler for every error, the Hub's lifespan.

`api` never imports `workers`, torch or onnxruntime; it reaches workers only through
`tasks` (names, payloads, queues) and Redis.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from api.admission import AdmissionGate
from api.body import BodyBudget
from api.fastpath import SyncFastPath, error_response
from api.hub import Hub
from api.janitor import Janitor
from api.metrics import MetricsMiddleware
from api.routes import health, jobs, sync
from api.routes import metrics as metrics_routes
from api.routes import shards as _shards  # noqa: F401 - registers the `shards` job input kind
from api.security import KeyRing, TenantGate
from api.webhooks import WebhookSender
from tasks import logs, tracing
from tasks.errors import TrifectaError
from tasks.models import MODELS, resolve, router_paths
from tasks.settings import Settings, get_settings

log = logging.getLogger("trifecta.api")
DOCS_ASSETS = "/docs-assets"
UNTRACED = frozenset({"/health", "/ping", "/metrics"})  # probes and scrapes: no trace each few seconds


def _untraced(scope: Scope) -> bool:
    return scope.get("path") in UNTRACED


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    logs.setup()  # a process of `trifecta api --workers N` starts here; elsewhere the CLI did it already
    settings.require_deployable("api")  # outside ENV=local: no API without keys
    # OTEL_* (tasks/tracing.py): once a tracer provider is set, FastAPI itself makes each request's
    # server span, continuing a caller's `traceparent`; tasks.wire carries it on in the messages
    tracing.setup(tracing.SERVICE_API)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hub = Hub(settings)
        app.state.hub = hub
        await hub.start()
        background = [WebhookSender(settings, hub.redis), Janitor(settings, hub.redis)]  # api/webhooks.py, api/janitor.py
        for b in background:
            b.start()
        try:
            yield
        finally:
            for b in background:
                await b.stop()
            await hub.stop()

    # /docs and /redoc load Swagger UI and ReDoc from the service itself (fastapi-offline ships the
    # files, served under DOCS_ASSETS), not from a CDN: they work on a cluster with no internet
    app = FastAPIOffline(
        static_url=DOCS_ASSETS,
        title="Trifecta",
        version="0.1.0",
        description="Queue-driven inference for vision models: sync masks, jobs, WebDataset shards, SAM3, V-JEPA 2, Mask2Former.",
        lifespan=lifespan,
        telemetry={"exclude": _untraced},
    )
    app.state.settings = settings
    app.add_middleware(SyncFastPath)  # innermost: POST /run_{model} without the router's overhead (api/fastpath.py)
    app.add_middleware(AdmissionGate)  # 503 for a full queue before routing (api/admission.py)
    app.add_middleware(BodyBudget, settings=settings)  # 503 past MAX_INFLIGHT_BODY_BYTES held at once, after the key check (api/body.py)
    # API keys → tenant, and the per-tenant rate limit, before any route (api/security.py)
    app.add_middleware(TenantGate, keys=KeyRing(settings), settings=settings)
    app.add_middleware(MetricsMiddleware)  # outermost: counts 401/429 answers too (api/metrics.py)

    @app.exception_handler(TrifectaError)
    async def _trifecta(_: Request, exc: TrifectaError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        msg = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()[:5])
        return JSONResponse({"error": {"code": "validation_error", "message": msg}}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _any(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    app.include_router(sync.router)
    app.include_router(jobs.router)
    app.include_router(health.router)
    app.include_router(metrics_routes.router)
    for path in router_paths(MODELS.values()):  # each family's own endpoints, as its ModelSpec names them
        app.include_router(resolve(path))
    return app
