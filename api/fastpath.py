"""The sync mask endpoints (`POST /run_{model}`) served straight from ASGI, ahead of FastAPI's router.

Why: per-process timestamps of an echo round trip at concurrency 1 (README, performance)
put ~130 µs between the innermost middleware and the endpoint function: FastAPI's route
matching over every route and its dependency solving, about a tenth of the whole round
trip, spent on the path users call most. This middleware runs the very same handler
(`api.routes.sync._run`) with the same settings, hub, store and tenant the dependencies
would give, and answers errors exactly as the app's exception handlers do. The routes stay
registered with FastAPI (OpenAPI schema, docs); any other method or path goes on to it.
It sits inside the tenant and admission gates, so keys, rate limits and 503s apply as before.
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from api.routes.sync import SYNC_MODELS, router, run_sync_endpoint
from storage.blob import open_store
from tasks.errors import UnknownModel, shown, translate

log = logging.getLogger("trifecta.api")
PATHS = {f"/run_{m}": m for m in SYNC_MODELS}
# the APIRoute the router would have matched, for what reads scope["route"] afterwards (metrics' route label)
ROUTES = {PATHS[r.path]: r for r in router.routes if getattr(r, "path", None) in PATHS and "POST" in (getattr(r, "methods", None) or ())}


class SyncFastPath:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        model = PATHS.get(path) if scope.get("method") == "POST" else None
        if model is None:
            if path.startswith("/run_") and path not in PATHS:  # the documented 404 for a model name we do not serve
                await unknown_model(path)(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        state = scope["app"].state  # the FastAPI app's (Starlette puts itself in the scope)
        scope["route"] = ROUTES[model]
        settings = state.settings
        request = Request(scope, receive)
        try:
            response = await run_sync_endpoint(model, request, settings, state.hub, open_store(settings.storage_url, settings.s3_endpoint_url), getattr(request.state, "tenant", "default"))
        except Exception as e:
            response = error_response(e)
        await response(scope, receive, send)


def unknown_model(path: str) -> JSONResponse:
    name = shown(path.removeprefix("/run_"))
    return error_response(UnknownModel(f"no model {name} has a sync endpoint here; POST to one of {', '.join(PATHS)} (GET /models/info lists every model)"))


def error_response(exc: Exception) -> JSONResponse:
    """Any exception as the client sees it (the app's catch-all handler and this fast path)."""
    err = translate(exc)
    if err.status >= 500 and err.code == "internal":
        log.exception("unhandled error", exc_info=exc)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)
