"""Reading request bodies with limits: counted while streaming, and again while gunzipping.

Neither uvicorn nor Starlette limits body size; `await request.body()` on a huge upload
would hold it all. Here a declared Content-Length over the limit is refused before a
byte is read, an undeclared (chunked) body is refused as soon as it passes the limit,
and `Content-Encoding: gzip` is inflated with a capped `zlib.decompressobj`.
"""

from __future__ import annotations

import zlib

from starlette.requests import Request

from tasks.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType


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
        return gunzip_capped(bytes(buf), limit)
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
