"""Reading request bodies with limits: counted while streaming, and again while gunzipping.

Neither uvicorn nor Starlette limits body size; `await request.body()` on a huge upload
would hold it all. Here a declared Content-Length over the limit is refused before a
byte is read, an undeclared (chunked) body is refused as soon as it passes the limit,
and `Content-Encoding: gzip` is inflated with a capped `zlib.decompressobj`.
"""

from __future__ import annotations

import asyncio
import re
import zlib
from typing import Any

from starlette.requests import Request

from tasks.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

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
    return out


# A multipart part that uploads a WebDataset shard: its file name, or a `kind=shard` field before it.
_SHARD_PART = re.compile(rb'filename="[^"\r\n]*\.(?:tar|tar\.gz|tgz)"|name="kind"\r\n\r\nshard\r\n', re.IGNORECASE)
# A multipart body that uploads a video job: a `kind=video` field before the file.
_VIDEO_PART = re.compile(rb'name="kind"\r\n\r\nvideo\r\n', re.IGNORECASE)
_HEAD = 64 << 10


def counted_request(request: Request, limit: int, shard_limit: int, video_limit: int = 0) -> Request:
    """The same request, its body counted while Starlette streams it (file parts spool to disk).

    Past `limit` → 413 as soon as the count passes it; a body whose first 64 KiB show a
    shard upload (a `.tar`/`.tar.gz` file part, or a `kind=shard` field before the file)
    may reach `shard_limit` instead, and one with a `kind=video` field before the file
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
    head = bytearray()
    state: dict[str, Any] = {"n": 0, "cap": limit, "which": "MAX_BODY_BYTES"}

    async def receive() -> dict:
        msg = await request.receive()
        if msg.get("type") == "http.request":
            body = msg.get("body", b"")
            if len(head) < _HEAD:
                head.extend(body[: _HEAD - len(head)])
                if state["which"] == "MAX_BODY_BYTES":
                    if _SHARD_PART.search(head):
                        state["cap"], state["which"] = shard_limit, "MAX_SHARD_UPLOAD_BYTES"
                    elif video_limit and _VIDEO_PART.search(head):
                        state["cap"], state["which"] = video_limit, "MAX_VIDEO_BYTES"
            state["n"] += len(body)
            if state["n"] > state["cap"]:
                raise PayloadTooLarge(f"the body passed {state['cap']} bytes ({state['which']})")
        return msg

    return Request(request.scope, receive)
