"""Overload answered before routing: a full queue costs a sync request almost nothing.

A pure ASGI middleware in front of the routes: for `POST /run_<model>` it asks the Hub's
in-memory state (queue depth, live workers, Redis reachable — refreshed by its poller)
and answers 503 with `Retry-After` itself, without FastAPI's routing, dependency
resolution or body reading. Requests it lets through are admitted again (with a
reservation) by the route. `/run_facemask` with no worker is left to the route (204).
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from tasks.errors import NoWorker, Overloaded

GATED = {"/run_segmentation": "segmentation", "/run_textmask": "textmask", "/run_facemask": "facemask", "/run_echo": "echo"}


class AdmissionGate:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            model = GATED.get(scope["path"])
            if model is not None:
                hub = getattr(scope["app"].state, "hub", None)
                if hub is not None:
                    try:
                        hub.check(model)
                    except NoWorker:
                        pass  # the route decides (facemask answers 204)
                    except Overloaded as err:
                        await JSONResponse(err.body(), status_code=err.status, headers=err.headers)(scope, receive, send)
                        return
        await self.app(scope, receive, send)
