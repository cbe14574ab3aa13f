"""Reading request bodies with limits: counted while streaming, and again while gunzipping.

Neither uvicorn nor Starlette limits body size; `await request.body()` on a huge upload
would hold it all. Here a declared Content-Length over the limit is refused before a
byte is read, an undeclared (chunked) body is refused as soon as it passes the limit,
and `Content-Encoding: gzip` is inflated with a capped `zlib.decompressobj` (one gzip
member only: a second one would be silently dropped, so it is refused).

`BodyBudget` bounds what all requests together hold: MAX_INFLIGHT_BODY_BYTES per API process.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tasks.errors import BadRequest, Overloaded, PayloadTooLarge, Unprocessable, UnsupportedMediaType
from tasks.settings import Settings

# `curl --data-binary @photo.jpg URL` without `-H 'Content-Type: …'` labels the body as a form;
# no form is ever meant on a raw-body endpoint, so that label counts as no label at all
UNLABELLED = {"", "application/x-www-form-urlencoded"}


def raw_body_type(request: Request) -> str:
    """The media type of a raw-body endpoint's body (`/run_*`, `/segment`, `/segment-batch`):
    a missing, empty or curl-default Content-Type is `application/octet-stream` (the image is
    sniffed from its bytes anyway); anything else is returned as given, for the route to check."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return "application/octet-stream" if ctype in UNLABELLED else ctype


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit} (MAX_BODY_BYTES)")
        except ValueError:
            raise BadRequest("Content-Length is not a number") from None
    enc = request.headers.get("content-encoding", "identity").strip().lower()
    if enc not in ("identity", "gzip", "x-gzip", ""):
        raise UnsupportedMediaType(f"Content-Encoding {enc!r} is not supported; use gzip or none")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise PayloadTooLarge(f"the body passed {limit} bytes (MAX_BODY_BYTES)")
    if enc in ("gzip", "x-gzip"):
        # off the event loop: inflating up to MAX_BODY_BYTES takes long enough to stall other requests
        return await asyncio.to_thread(gunzip_capped, bytes(buf), limit)
    return bytes(buf)


def gunzip_capped(data: bytes, limit: int) -> bytes:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as e:
        raise BadRequest(f"the gzip body is corrupt: {e}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise PayloadTooLarge(f"the body inflates past {limit} bytes (MAX_BODY_BYTES)")
    if not d.eof:
        raise BadRequest("the gzip body is truncated")
    if d.unused_data:  # a second gzip member (or trailing bytes): zlib stops at the first member's end
        raise Unprocessable(f"the gzip body has {len(d.unused_data)} bytes after its first member (concatenated gzip?); send the body as one gzip member")
    return out


SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_WATCH_BYTES = 64 << 10  # the limit is decided from the parts that start within this many bytes


class PartWatch:
    """Follows a multipart body's real part headers while it streams, with python-multipart
    (the parser Starlette itself uses), to pick the upload limit: a `kind` field's value and
    the file part's `Content-Disposition` filename. A field's *value* that looks like a part
    header (`filename="z.tar"`) is data here, never a header. Decided at the first file part's
    headers, or undecided after 64 KiB (the default limit stays)."""

    def __init__(self, boundary: bytes) -> None:
        self.kind: str | None = None
        self.filename: str | None = None
        self.done = False
        self.seen = 0
        self._hf, self._hv = bytearray(), bytearray()
        self._disp: bytes = b""
        self._name: bytes | None = None
        self._value = bytearray()
        cbs = {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, a, b: self._hf.extend(d[a:b]),
            "on_header_value": lambda d, a, b: self._hv.extend(d[a:b]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_done,
            "on_part_data": self._data,
            "on_part_end": self._end,
        }
        self.parser = MultipartParser(boundary, cbs)  # type: ignore[arg-type]

    def feed(self, chunk: bytes) -> None:
        if self.done:
            return
        take = chunk[: _WATCH_BYTES - self.seen]
        self.seen += len(take)
        try:
            self.parser.write(take)
        except Exception:  # noqa: BLE001 - a malformed body: Starlette's own parser answers it
            self.done = True
        if self.seen >= _WATCH_BYTES:
            self.done = True

    def _begin(self) -> None:
        self._disp, self._name, self._value = b"", None, bytearray()

    def _header_end(self) -> None:
        if bytes(self._hf).strip().lower() == b"content-disposition":
            self._disp = bytes(self._hv)
        self._hf, self._hv = bytearray(), bytearray()

    def _headers_done(self) -> None:
        _, opts = parse_options_header(self._disp)
        self._name = opts.get(b"name")
        if b"filename" in opts:  # the file part: the limit is decided now
            self.filename = opts[b"filename"].decode("utf-8", "replace")
            self.done = True

    def _data(self, d: bytes, a: int, b: int) -> None:
        if self._name == b"kind" and len(self._value) < 32:
            self._value.extend(d[a:b][:32])

    def _end(self) -> None:
        if self._name == b"kind":
            self.kind = bytes(self._value).decode("utf-8", "replace").strip().lower()


def counted_request(request: Request, limit: int, shard_limit: int, video_limit: int = 0) -> Request:
    """The same request, its body counted while Starlette streams it (file parts spool to disk).

    Past `limit` → 413 as soon as the count passes it. The parts' real headers decide a
    larger limit (`PartWatch`): a file part named `*.tar`/`*.tar.gz`/`*.tgz`, or a `kind=shard`
    field before the file, may reach `shard_limit`; a `kind=video` field before the file
    `video_limit` (when given). Nothing is held in memory beyond Starlette's spool.
    """
    top = max(limit, shard_limit, video_limit)
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > top:
                raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {top}")
        except ValueError:
            raise BadRequest("Content-Length is not a number") from None
    _, params = parse_options_header(request.headers.get("content-type", ""))
    watch = PartWatch(params[b"boundary"]) if params.get(b"boundary") else None
    state: dict[str, Any] = {"n": 0, "cap": limit, "which": "MAX_BODY_BYTES"}

    async def receive() -> dict:
        msg = await request.receive()
        if msg.get("type") == "http.request":
            body = msg.get("body", b"")
            if watch is not None and not watch.done:
                watch.feed(body)
                if watch.done:
                    if video_limit and watch.kind == "video":
                        state["cap"], state["which"] = video_limit, "MAX_VIDEO_BYTES"
                    elif watch.kind == "shard" or (watch.kind in (None, "image") and (watch.filename or "").lower().endswith(SHARD_SUFFIXES)):
                        state["cap"], state["which"] = shard_limit, "MAX_SHARD_UPLOAD_BYTES"
            state["n"] += len(body)
            if state["n"] > state["cap"]:
                raise PayloadTooLarge(f"the body passed {state['cap']} bytes ({state['which']})")
        return msg

    return Request(request.scope, receive)


class BodyBudget:
    """ASGI middleware: at most MAX_INFLIGHT_BODY_BYTES of request bodies held at once by this process.

    Each request counts what it sends, at most MAX_BODY_BYTES (the most one request holds in
    memory: bigger uploads stream to disk), reserved from `Content-Length` up front when it
    is declared, else chunk by chunk as it arrives. Past the budget: 503 `overloaded` with
    `Retry-After`, before the body is read (declared) or as soon as the chunk that passes it
    arrives (chunked). A request is always admitted while no other body is held, so one
    request of MAX_BODY_BYTES always fits. Released when the request's answer is sent.
    """

    RETRY_AFTER_S = 1

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.budget = settings.max_inflight_body_bytes
        self.per_request = settings.max_body_bytes
        self.held = 0

    def _take(self, mine: int, n: int) -> int:
        """Bytes newly reserved for a request holding `mine` (0 when nothing new); raises past the budget."""
        want = min(mine + n, self.per_request) - mine
        if want <= 0:
            return 0
        others = self.held - mine
        if others > 0 and self.held + want > self.budget:
            raise Overloaded(
                f"the API holds {self.held} bytes of request bodies; MAX_INFLIGHT_BODY_BYTES={self.budget}. Retry after the Retry-After header",
                headers={"Retry-After": str(self.RETRY_AFTER_S)},
            )
        self.held += want
        return want

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = None
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    declared = None  # the route answers 400
        mine = 0
        try:
            if declared is not None:
                try:
                    mine += self._take(mine, declared)
                except Overloaded as err:
                    await JSONResponse(err.body(), status_code=err.status, headers=err.headers)(scope, receive, send)
                    return
                await self.app(scope, receive, send)
                return

            async def counted() -> Message:
                nonlocal mine
                msg = await receive()
                if msg.get("type") == "http.request" and msg.get("body"):
                    mine += self._take(mine, len(msg["body"]))
                return msg

            await self.app(scope, counted, send)
        finally:
            self.held -= mine
