"""Overload answered before routing: a 503 costs almost nothing, on every endpoint that enqueues work.

A pure ASGI middleware in front of the routes. For a request that would enqueue work it asks
the Hub's in-memory state (queue depths, live workers, Redis reachable — refreshed by its
poller every POLL_S) and answers 503 with `Retry-After` itself: no routing, no dependency
resolution, no body read, no Redis round trip. What the gate cannot know before the body is
read, the route decides later, from the same memory (`Hub.admit`) and before it writes anything:

| endpoint | model | the gate checks | the route adds |
| --- | --- | --- | --- |
| `POST /run_<model>` | the path | Redis, a live worker, room | its reservation; `/run_facemask` with no worker → 204 |
| `POST /api/v1/infer` | vjepa2 | Redis, a live worker, room | its reservation |
| `POST /segment`, `/segment-batch` | `X-Model` / `?model=` | Redis, a live worker, room | its reservation |
| `POST /api/v1/image/segment`, `/cached-features` | sam3 | Redis, room | its input's 4xx, then a live worker and room in the private queue of the worker owning the image |
| `POST /v1/jobs` | in the body | Redis | a live worker and room once the body names the model (shard jobs: a live worker; their queue is their own) |
| `/api/v1/video/*` | the session's | Redis | a worker with a free session slot; room in the session worker's private queue |

Requests the gate lets through are admitted again (with a reservation) by the route.
The table is not written here: each model's `ModelSpec` (tasks/models.py) declares its `sync`
endpoint and its `admission` (paths, `pick`, `no_worker_to_route`, `broker_only`).
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qs

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from tasks import models
from tasks.errors import NoWorker, TrifectaError


def header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k == name:
            return v.decode("latin-1")
    return None


def query(scope: Scope, name: str) -> str | None:
    qs: bytes = scope.get("query_string", b"")
    if name.encode() not in qs:  # the common case costs no parsing
        return None
    return (parse_qs(qs.decode("latin-1")).get(name) or [None])[0]


def _model(name: str) -> Callable[[Scope], str | None]:
    return lambda _scope: name


def gated(specs: list[models.ModelSpec]) -> dict[str, Callable[[Scope], str | None]]:
    """POST path → the model it enqueues for (None: the route answers, e.g. an unknown X-Model)."""
    return {path: (models.resolve(pick) if pick else _model(model)) for path, (model, pick) in models.gated_paths(specs).items()}


_SPECS = list(models.MODELS.values())
GATED: dict[str, Callable[[Scope], str | None]] = gated(_SPECS)
# "no live worker" is a standing state, not a burst: where the route has something better to say
# first, it answers it (from memory as well): /run_facemask's 204 (the source contract), and the
# SAM3 image endpoints' 4xx for a bad image or prompt, refused whether or not a sam3 worker runs
NO_WORKER_TO_ROUTE = models.no_worker_to_route(_SPECS)
BROKER_ONLY = models.broker_only(_SPECS)  # every call of a session goes through Redis; its worker is known only there


def decide(scope: Scope) -> TrifectaError | None:
    """The gate's 503 for this request, or None to let it through. Memory only."""
    hub = getattr(scope["app"].state, "hub", None)
    if hub is None:
        return None
    path, method = scope["path"], scope["method"]
    try:
        resolve = GATED.get(path) if method == "POST" else None
        if resolve is not None:
            model = resolve(scope)
            if model is not None:
                hub.check(model)
        elif (path == "/v1/jobs" and method == "POST") or path.startswith(BROKER_ONLY):
            hub.check_broker()
    except NoWorker as err:
        return None if path in NO_WORKER_TO_ROUTE else err
    except TrifectaError as err:
        return err
    return None


class AdmissionGate:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            err = decide(scope)
            if err is not None:
                await JSONResponse(err.body(), status_code=err.status, headers=err.headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)
