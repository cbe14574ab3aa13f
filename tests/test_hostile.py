"""Hostile input against a real stack (API + textmask worker running PP-OCRv4 + echo worker).

One table of single-request cases, each with its exact status and error code; after every
case the service must still answer a normal request (a small photo through the textmask
worker, mask shape checked) with its worker processes alive. Inputs whose meaning needs
pixels (animations, colour modes, EXIF rotation, tar batches) have their own tests that
check mask values. `INPUTS_TRIED` counts every hostile input sent (docs/security.md).
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import random
import re
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import unquote

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from storage import codecs
from tests.conftest import photo, png_bytes, wait_job, with_text

LIMIT = 2_000_000  # MAX_BODY_BYTES of this stack: small, so over-limit bodies cost little to send
MEMBER_LIMIT = 400_000  # MAX_SAMPLE_BYTES
SYNC_BATCH = 24  # MAX_SYNC_BATCH
PARAMS_LIMIT = 4096  # MAX_PARAMS_BYTES


@pytest.fixture(scope="module")
def inputs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("allowed-inputs")
    (root / "small.png").write_bytes(small_png())
    (root / "escape.png").symlink_to("/etc/passwd")  # resolves outside the root
    return root


@pytest.fixture(scope="module")
def stack(make_stack, inputs_root: Path):
    env = {
        "MAX_BODY_BYTES": str(LIMIT),
        "MAX_SAMPLE_BYTES": str(MEMBER_LIMIT),
        "MAX_SYNC_BATCH": str(SYNC_BATCH),
        "MAX_PARAMS_BYTES": str(PARAMS_LIMIT),
        "ALLOWED_INPUT_ROOTS": str(inputs_root),
    }
    return make_stack(models=["textmask", "echo"], env=env)


# ------------------------------------------------------------------ building hostile bytes
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(w: int, h: int, bitdepth: int, colour: int, rows: Callable[[int], bytes] | None = None, extra: bytes = b"") -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB or lie about sizes); rows default to zeros."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
    zero = b"\0" * ((w * bitdepth * channels + 7) // 8 + 1)
    co = zlib.compressobj(9)
    idat = b"".join(co.compress(zero if rows is None else rows(y)) for y in range(h)) + co.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, bitdepth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png16(a: np.ndarray) -> bytes:
    """H x W x C uint16 → a 16-bit PNG (grey, grey+alpha, RGB or RGBA)."""
    h, w, c = a.shape
    return raw_png(w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], rows=lambda y: b"\0" + a[y].astype(">u2").tobytes())


@cache
def small_png() -> bytes:
    return png_bytes(photo("coffee.png").resize((64, 48)))


@cache
def text_photo() -> tuple[Image.Image, np.ndarray, bytes]:
    data, gt = with_text("chelsea.png")
    return Image.open(io.BytesIO(data)).convert("RGB"), gt, data


@cache
def jpeg() -> bytes:
    return png_bytes(text_photo()[0], "JPEG", quality=90)


@cache
def webp() -> bytes:
    return png_bytes(text_photo()[0], "WEBP", quality=80)


def flipped(data: bytes, start: int, n: int = 64, seed: int = 0) -> bytes:
    """n bytes past `start` inverted, at seeded positions (the same corruption every run)."""
    r, b = random.Random(seed), bytearray(data)
    for _ in range(n):
        b[start + r.randrange(len(data) - start - 2)] ^= 0xFF
    return bytes(b)


def jpeg_patched(marker: bytes, offset: int, data: bytes) -> bytes:
    """The JPEG with bytes overwritten inside a segment (flipping bytes in the entropy-coded scan
    is no test: libjpeg resynchronises and decodes a garbled image without an error)."""
    j = bytearray(jpeg())
    at = j.index(marker) + offset
    j[at : at + len(data)] = data
    return bytes(j)


def gif_lying_about(where: str) -> bytes:
    """A 4x4 GIF whose logical screen or first frame descriptor claims 65535 x 65535."""
    b = io.BytesIO()
    Image.new("P", (4, 4)).save(b, "GIF")
    g = bytearray(b.getvalue())
    at = 6 if where == "screen" else g.index(b",") + 5
    g[at : at + 4] = struct.pack("<HH", 65535, 65535)
    return bytes(g)


def jpeg_sof_60000() -> bytes:
    j = bytearray(png_bytes(Image.new("RGB", (8, 8)), "JPEG"))
    at = j.index(b"\xff\xc0") + 5
    j[at : at + 4] = struct.pack(">HH", 60000, 60000)
    return bytes(j)


def webp_vp8l_16384() -> bytes:
    w = bytearray(png_bytes(Image.new("RGB", (8, 8), (200, 10, 10)), "WEBP", lossless=True))
    at = w.index(b"VP8L") + 9  # after the chunk header and the 0x2f signature: 14 bits width-1, 14 bits height-1
    bits = struct.unpack("<I", w[at : at + 4])[0] & ~((1 << 28) - 1)
    w[at : at + 4] = struct.pack("<I", bits | 16383 | 16383 << 14)
    return bytes(w)


def webp_bad_start_code() -> bytes:
    c = bytearray(webp())
    at = c.index(b"VP8 ") + 8 + 3  # frame tag (3 bytes), then the start code 9d 01 2a
    c[at : at + 3] = b"\0\0\0"
    return bytes(c)


def png_chunk_bomb(kind: bytes) -> bytes:
    """An 8x8 PNG with a zTXt or iCCP chunk that inflates to 50 MB."""
    body = (b"k\0\0" if kind == b"zTXt" else b"icc\0\0") + zlib.compress(b"A" * 50_000_000, 9)
    return raw_png(8, 8, 8, 2, extra=_chunk(kind, body))


@cache
def gzip_bomb() -> bytes:
    return gzip.compress(b"\0" * (LIMIT * 25), 9)  # 50 MB of zeros in ~50 KB


def chunked(data: bytes, size: int = 1 << 16) -> Iterator[bytes]:
    """A generator body: httpx sends it with Transfer-Encoding: chunked and no Content-Length."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


def multipart(fields: dict[str, str], file: bytes) -> tuple[bytes, str]:
    boundary = "----trifecta-hostile"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'.encode() + file + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def job_json(image: bytes, model: str = "textmask", **extra: object) -> bytes:
    return json.dumps({"model": model, "input": {"image": base64.b64encode(image).decode()}, **extra}).encode()


def sam3_json(image: bytes | None = None, prompts: list | None = None) -> bytes:
    return json.dumps({"image": base64.b64encode(small_png() if image is None else image).decode(), "prompts": prompts or [{"type": "text", "text": "cat"}]}).encode()


# ------------------------------------------------------------------ the table
@dataclass
class Case:
    id: str
    path: str
    body: Callable[[], bytes | Iterator[bytes]]
    headers: dict[str, str]
    status: int
    code: str
    method: str = "POST"


def png_to(path: str, body: Callable[[], bytes], status: int, code: str, ctype: str = "image/png", **headers: str) -> Case:
    return Case("", path, body, {"Content-Type": ctype, **headers}, status, code)


def case(id: str, c: Case) -> Case:
    c.id = id
    return c


TM = "/run_textmask"
SAM3 = "/api/v1/image/segment"
JOBS = "/v1/jobs"
JSON = "application/json"
CASES = [
    # decompression bombs: refused from the header, before any pixel is decoded
    case("png-10000x10000-in-12KB", png_to(TM, lambda: raw_png(10000, 10000, 1, 0), 413, "image_too_large")),
    case("png-1.2x-limit-pillow-warn-band", png_to(TM, lambda: raw_png(8000, 7500, 1, 0), 413, "image_too_large")),
    case("gif-screen-65535x65535", png_to(TM, lambda: gif_lying_about("screen"), 413, "image_too_large", "image/gif")),
    case("gif-frame-65535x65535-in-4x4-screen", png_to(TM, lambda: gif_lying_about("frame"), 413, "image_too_large", "image/gif")),
    case("jpeg-sof-60000x60000", png_to(TM, jpeg_sof_60000, 413, "image_too_large", "image/jpeg")),
    case("webp-vp8l-16384x16384", png_to(TM, webp_vp8l_16384, 413, "image_too_large", "image/webp")),
    case("png-ztxt-chunk-bomb", png_to(TM, lambda: png_chunk_bomb(b"zTXt"), 413, "image_too_large")),
    case("png-iccp-chunk-bomb", png_to(TM, lambda: png_chunk_bomb(b"iCCP"), 413, "image_too_large")),
    case("bomb-as-octet-stream", png_to(TM, lambda: raw_png(10000, 10000, 1, 0), 413, "image_too_large", "application/octet-stream")),
    case("job-base64-bomb", png_to(JOBS, lambda: job_json(raw_png(10000, 10000, 1, 0)), 413, "image_too_large", JSON)),
    # bodies over MAX_BODY_BYTES, declared, chunked, gzipped
    case("body-over-limit-content-length", png_to(TM, lambda: b"\0" * (LIMIT + 1), 413, "payload_too_large")),
    case("body-over-limit-chunked", png_to(TM, lambda: chunked(b"\0" * (LIMIT * 3)), 413, "payload_too_large")),
    case("gzip-bomb-content-encoding", png_to(TM, gzip_bomb, 413, "payload_too_large", **{"Content-Encoding": "gzip"})),
    case("gzip-bomb-chunked", png_to(TM, lambda: chunked(gzip_bomb()), 413, "payload_too_large", **{"Content-Encoding": "gzip"})),
    case("gzip-bomb-job-json", png_to(JOBS, gzip_bomb, 413, "payload_too_large", JSON, **{"Content-Encoding": "gzip"})),
    case("gzip-bomb-tar+gzip", png_to(TM, gzip_bomb, 413, "payload_too_large", "application/x-tar+gzip")),
    case("job-base64-over-limit", png_to(JOBS, lambda: job_json(b"\xff" * LIMIT), 413, "payload_too_large", JSON)),
    case("job-base64-over-limit-chunked", png_to(JOBS, lambda: chunked(job_json(b"\xff" * LIMIT)), 413, "payload_too_large", JSON)),
    case("job-multipart-over-limit", Case("", JOBS, lambda: multipart({"model": "textmask"}, b"\0" * LIMIT)[0], {"Content-Type": multipart({}, b"")[1]}, 413, "payload_too_large")),
    case("job-multipart-over-limit-chunked", Case("", JOBS, lambda: chunked(multipart({"model": "textmask"}, b"\0" * LIMIT)[0]), {"Content-Type": multipart({}, b"")[1]}, 413, "payload_too_large")),
    # each part under the limit, the body over it: caught only by counting the whole stream
    case(
        "job-multipart-parts-under-limit-sum-over-chunked",
        Case("", JOBS, lambda: chunked(multipart({"model": "textmask", "pad": "p" * (LIMIT // 2)}, b"\0" * (LIMIT // 2 + 1000))[0]), {"Content-Type": multipart({}, b"")[1]}, 413, "payload_too_large"),
    ),
    case("gzip-corrupt", png_to(TM, lambda: flipped(gzip.compress(small_png()), 20, 40), 400, "bad_request", **{"Content-Encoding": "gzip"})),
    case("gzip-truncated", png_to(TM, lambda: gzip.compress(small_png())[:-30], 400, "bad_request", **{"Content-Encoding": "gzip"})),
    case("content-encoding-br", png_to(TM, small_png, 415, "unsupported_media_type", **{"Content-Encoding": "br"})),
    # truncated and corrupt images: 422, from the header probe (API) or the decode (worker)
    case("jpeg-truncated-half", png_to(TM, lambda: jpeg()[: len(jpeg()) // 2], 422, "undecodable_image", "image/jpeg")),
    case("jpeg-truncated-200-bytes", png_to(TM, lambda: jpeg()[:200], 422, "undecodable_image", "image/jpeg")),
    case("png-truncated-half", png_to(TM, lambda: text_photo()[2][: len(text_photo()[2]) // 2], 422, "undecodable_image")),
    case("png-truncated-20-bytes", png_to(TM, lambda: text_photo()[2][:20], 422, "undecodable_image")),
    case("png-ihdr-only-100000x100000", png_to(TM, lambda: raw_png(100000, 100000, 8, 2, rows=lambda y: b"")[:33], 422, "undecodable_image")),
    case("webp-truncated-half", png_to(TM, lambda: webp()[: len(webp()) // 2], 422, "undecodable_image", "image/webp")),
    case("gif-truncated-20-bytes", png_to(TM, lambda: png_bytes(text_photo()[0], "GIF")[:20], 422, "undecodable_image", "image/gif")),
    case("jpeg-corrupt-huffman-table", png_to(TM, lambda: jpeg_patched(b"\xff\xc4", 5, b"\xff" * 16), 422, "undecodable_image", "image/jpeg")),
    case("jpeg-corrupt-scan-component", png_to(TM, lambda: jpeg_patched(b"\xff\xda", 5, b"\x77"), 422, "undecodable_image", "image/jpeg")),
    case("png-corrupt-idat", png_to(TM, lambda: flipped(text_photo()[2], 100), 422, "undecodable_image")),
    case("webp-corrupt-start-code", png_to(TM, webp_bad_start_code, 422, "undecodable_image", "image/webp")),
    case("empty-body", png_to(TM, lambda: b"", 422, "undecodable_image")),
    case("job-invalid-base64", png_to(JOBS, lambda: b'{"model":"textmask","input":{"image":"not base64!"}}', 422, "unprocessable", JSON)),
    case("job-invalid-json", png_to(JOBS, lambda: b'{"model":"textmask","input":', 422, "unprocessable", JSON)),
    case("job-json-array", png_to(JOBS, lambda: b"[1,2,3]", 422, "unprocessable", JSON)),
    # content types we do not read
    case("text-plain", png_to(TM, small_png, 415, "unsupported_media_type", "text/plain")),
    case("json-to-sync-endpoint", png_to(TM, lambda: b'{"image": "x"}', 415, "unsupported_media_type", JSON)),
    case("svg", png_to(TM, lambda: b'<svg xmlns="http://www.w3.org/2000/svg"/>', 415, "unsupported_media_type", "image/svg+xml")),
    case("pdf-as-octet-stream", png_to(TM, lambda: b"%PDF-1.7\n" + b"\0" * 100, 415, "unsupported_media_type", "application/octet-stream")),
    case("html-labelled-png", png_to(TM, lambda: b"<html><body>hi</body></html>", 415, "unsupported_media_type")),
    case("multipart-to-sync-endpoint", png_to(TM, lambda: multipart({}, small_png())[0], 415, "unsupported_media_type", multipart({}, b"")[1])),
    case("job-text-plain", png_to(JOBS, lambda: b"model=textmask", 415, "unsupported_media_type", "text/plain")),
    case("not-a-tar", png_to(TM, lambda: b"hello, not a tar", 422, "unprocessable", "application/x-tar")),
    # absurd parameters and query strings
    case("job-params-over-limit", png_to(JOBS, lambda: job_json(small_png(), params={"prompt": "x" * PARAMS_LIMIT}), 413, "payload_too_large", JSON)),
    case("job-params-200k-points", png_to(JOBS, lambda: job_json(small_png(), params={"points": [[1, 2]] * 200_000}), 413, "payload_too_large", JSON)),
    case("job-params-int-past-64-bits", png_to(JOBS, lambda: job_json(small_png(), params={"n": 2**100}), 422, "unprocessable", JSON)),
    case("job-params-nested-300-deep", png_to(JOBS, lambda: b'{"model":"textmask","input":{"image":"AA=="},"params":' + b'{"a":' * 300 + b"1" + b"}" * 301, 422, "unprocessable", JSON)),
    case("job-params-not-object", png_to(JOBS, lambda: job_json(small_png(), params=[1, 2]), 422, "unprocessable", JSON)),
    case("job-unknown-model", png_to(JOBS, lambda: job_json(small_png(), model="../../etc"), 404, "unknown_model", JSON)),
    case("idempotency-key-300-chars", png_to(JOBS, lambda: job_json(small_png()), 422, "validation_error", JSON, **{"Idempotency-Key": "k" * 300})),
    case("echo-sleep-ms-not-a-number", png_to("/run_echo?sleep_ms=abc", small_png, 400, "bad_request")),
    case("echo-sleep-ms-huge", png_to("/run_echo?sleep_ms=1e12", small_png, 422, "unprocessable")),
    case("timeout-negative", png_to(TM + "?timeout=-1", small_png, 400, "bad_request")),
    case("timeout-nan", png_to(TM + "?timeout=nan", small_png, 400, "bad_request")),
    case("format-unknown", png_to(TM + "?format=gif", small_png, 400, "bad_request")),
    case("png-format-for-a-tar", png_to(TM + "?format=png", lambda: b"\0" * 1024, 400, "bad_request", "application/x-tar")),
    case("job-id-4000-chars", Case("", "/v1/jobs/" + "a" * 4000, lambda: b"", {}, 404, "job_not_found", "GET")),
    case("job-result-of-unknown-id", Case("", "/v1/jobs/" + "0" * 32 + "/result?key=../../x", lambda: b"", {}, 404, "job_not_found", "GET")),
    case("job-list-limit-100000", Case("", "/v1/jobs?limit=100000", lambda: b"", {}, 422, "validation_error", "GET")),
    case("job-list-offset-negative", Case("", "/v1/jobs?offset=-5", lambda: b"", {}, 422, "validation_error", "GET")),
    # SAM3 prompts of absurd sizes: refused before the queue (no sam3 worker needed to answer)
    case("sam3-100k-prompts", png_to(SAM3, lambda: sam3_json(prompts=["cat"] * 100_000), 422, "unprocessable", JSON)),
    case("sam3-1MB-text-prompt", png_to(SAM3, lambda: sam3_json(prompts=[{"type": "text", "text": "c" * 1_000_000}]), 422, "unprocessable", JSON)),
    case("sam3-box-1e308", png_to(SAM3, lambda: sam3_json(prompts=[{"type": "box", "box": [1e308, 0.5, 0.1, 0.1]}]), 422, "unprocessable", JSON)),
    case("sam3-box-100k-numbers", png_to(SAM3, lambda: sam3_json(prompts=[{"type": "box", "box": [0.5] * 100_000}]), 422, "unprocessable", JSON)),
    case(
        "sam3-cached-features-100k-texts",
        png_to("/api/v1/image/cached-features", lambda: json.dumps({"image": base64.b64encode(small_png()).decode(), "text_prompts": ["cat"] * 100_000}).encode(), 422, "unprocessable", JSON),
    ),
    case("sam3-body-over-limit", png_to(SAM3, lambda: sam3_json(image=b"\xff" * LIMIT), 413, "payload_too_large", JSON)),
    case("sam3-image-bomb", png_to(SAM3, lambda: sam3_json(image=raw_png(10000, 10000, 1, 0)), 413, "image_too_large", JSON)),
    case(
        "sam3-multipart-parts-under-limit-sum-over-chunked",
        Case("", SAM3, lambda: chunked(multipart({"prompt": "cat", "pad": "p" * (LIMIT // 2)}, b"\0" * (LIMIT // 2 + 1000))[0]), {"Content-Type": multipart({}, b"")[1]}, 413, "payload_too_large"),
    ),
    # input URIs outside what the caller may read
    case("uri-etc-passwd", png_to(JOBS, lambda: b'{"model":"textmask","input":{"uri":"file:///etc/passwd"}}', 403, "forbidden", JSON)),
    case("uri-bare-path-etc-shadow", png_to(JOBS, lambda: b'{"model":"textmask","input":{"uri":"/etc/shadow"}}', 403, "forbidden", JSON)),
    case("uri-cloud-metadata-http", png_to(JOBS, lambda: b'{"model":"textmask","input":{"uri":"http://169.254.169.254/latest/meta-data/"}}', 400, "bad_request", JSON)),
    case("uri-own-staging-key", png_to(JOBS, lambda: b'{"model":"textmask","input":{"uri":"key:default/jobs/x/_in/input"}}', 400, "bad_request", JSON)),
    case("uri-s3-with-file-storage", png_to(JOBS, lambda: b'{"model":"textmask","input":{"uri":"s3://any-bucket/a.png"}}', 403, "forbidden", JSON)),
]


def _send(url: str, c: Case) -> httpx.Response:
    return httpx.request(c.method, url + c.path, content=c.body() if c.method == "POST" else None, headers=c.headers, timeout=60)


def still_serves(stack) -> None:
    """A normal request right after: a 64x48 photo through the real textmask worker."""
    r = httpx.post(stack.url + "/run_textmask?format=png", content=small_png(), headers={"Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 200, r.text
    assert codecs.decode_png(r.content).shape == (48, 64)
    assert all(w.alive() for w in stack.workers), [w.tail() for w in stack.workers if not w.alive()]


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_hostile_request_is_refused_and_service_still_serves(stack, c: Case) -> None:
    r = _send(stack.url, c)
    assert r.status_code == c.status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["code"] == c.code, err
    assert err["message"]
    still_serves(stack)


def test_uri_paths_under_allowed_root(stack, inputs_root: Path) -> None:
    """A symlink inside ALLOWED_INPUT_ROOTS pointing out of it is refused; `..` out of it too; a real file in it works."""
    for uri in (f"file://{inputs_root}/escape.png", f"file://{inputs_root}/../../etc/passwd"):
        r = httpx.post(stack.url + JOBS, json={"model": "textmask", "input": {"uri": uri}}, timeout=10)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text
    r = httpx.post(stack.url + JOBS, json={"model": "textmask", "input": {"uri": f"file://{inputs_root}/small.png"}, "params": {"format": "png"}}, timeout=10)
    assert r.status_code == 202, r.text
    j = wait_job(stack.url, r.json()["job_id"])
    assert j["status"] == "succeeded" and j["result"]["outputs"][0]["shape"] == [48, 64], j



def test_async_job_with_truncated_image_fails_with_422_code(stack) -> None:
    """The API's header probe passes a JPEG cut in half; the worker's decode fails it, and the job says why."""
    r = httpx.post(stack.url + JOBS, content=job_json(jpeg()[: len(jpeg()) // 2]), headers={"Content-Type": JSON}, timeout=10)
    assert r.status_code == 202, r.text
    j = wait_job(stack.url, r.json()["job_id"])
    assert j["status"] == "failed" and j["error"]["code"] == "undecodable_image", j
    r = httpx.get(stack.url + f"/v1/jobs/{j['job_id']}/result")
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
    still_serves(stack)


def test_multipart_job_under_limit_still_parses(stack) -> None:
    """The capped multipart reader still accepts a normal upload (the same path the over-limit cases hit)."""
    body, ctype = multipart({"model": "textmask", "params": '{"format": "png"}'}, small_png())
    r = httpx.post(stack.url + JOBS, content=body, headers={"Content-Type": ctype}, timeout=10)
    assert r.status_code == 202, r.text
    j = wait_job(stack.url, r.json()["job_id"])
    assert j["status"] == "succeeded" and j["result"]["outputs"][0]["shape"] == [48, 64], j


# ------------------------------------------------------------------ inputs judged by their masks
def _mask(stack, data: bytes, ctype: str, **headers: str) -> np.ndarray:
    r = httpx.post(stack.url + "/run_textmask?format=png", content=data, headers={"Content-Type": ctype, **headers}, timeout=60)
    assert r.status_code == 200, r.text
    return codecs.decode_png(r.content)


def _on_text(mask: np.ndarray, gt: np.ndarray, precision: float = 0.9) -> None:
    assert mask.sum() > 300, "the text must be found"
    assert mask[gt].sum() / mask.sum() > precision, "the mask must lie on the text"


def _modes() -> dict[str, Callable[[Image.Image, np.ndarray], tuple[bytes, str]]]:
    def p16(im: Image.Image, c: int) -> bytes:
        a = np.asarray(im).astype(np.uint16) * 257
        if c == 1:
            a = (np.asarray(im.convert("L")).astype(np.uint16) * 257)[:, :, None]
        if c == 4:
            a = np.concatenate([a, np.full(a.shape[:2] + (1,), 30000, np.uint16)], 2)
        return png16(a)

    return {
        "cmyk-jpeg": lambda im, _: (png_bytes(im.convert("CMYK"), "JPEG", quality=95), "image/jpeg"),
        "cmyk-tiff": lambda im, _: (png_bytes(im.convert("CMYK"), "TIFF"), "image/tiff"),
        "grey-L": lambda im, _: (png_bytes(im.convert("L")), "image/png"),
        "grey-alpha-LA": lambda im, _: (png_bytes(im.convert("LA")), "image/png"),
        "bilevel-1": lambda im, _: (png_bytes(im.convert("1")), "image/png"),
        "rgba": lambda im, _: (png_bytes(im.convert("RGBA")), "image/png"),
        "palette": lambda im, _: (png_bytes(im.convert("P", palette=Image.Palette.ADAPTIVE)), "image/png"),
        "palette-transparency": lambda im, _: (png_bytes(im.convert("P", palette=Image.Palette.ADAPTIVE), transparency=0), "image/png"),
        "grey-16bit": lambda im, _: (p16(im, 1), "image/png"),
        "rgb-48bit": lambda im, _: (p16(im, 3), "image/png"),
        "rgba-64bit": lambda im, _: (p16(im, 4), "image/png"),
        "bmp": lambda im, _: (png_bytes(im, "BMP"), "image/bmp"),
        "webp-alpha": lambda im, _: (png_bytes(im.convert("RGBA"), "WEBP", quality=90), "image/webp"),
        "gzip-encoded-png": lambda im, _: (gzip.compress(png_bytes(im)), "image/png"),
    }


MODES = _modes()


@pytest.mark.parametrize("mode", list(MODES))
def test_colour_modes_give_a_mask_of_the_right_shape_on_the_text(stack, mode: str) -> None:
    im, gt, _ = text_photo()
    data, ctype = MODES[mode](im, gt)
    mask = _mask(stack, data, ctype, **({"Content-Encoding": "gzip"} if mode.startswith("gzip") else {}))
    assert mask.shape == (300, 451)
    _on_text(mask, gt, 0.6 if mode == "bilevel-1" else 0.9)  # dithering to 1 bit leaves speckles that read as text


ORIENTATIONS = [6, 8, 3]


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_exif_rotated_jpeg_gives_the_mask_in_displayed_orientation(stack, orientation: int) -> None:
    """Pixels stored rotated with an EXIF Orientation tag that rotates them back: the mask follows the displayed image."""
    im, gt, _ = text_photo()
    undo = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270, 3: Image.Transpose.ROTATE_180}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = im.transpose(undo)
    data = png_bytes(stored, "JPEG", exif=exif.tobytes(), quality=95)
    assert Image.open(io.BytesIO(data)).size == stored.size
    assert orientation == 3 or stored.size != im.size
    mask = _mask(stack, data, "image/jpeg")
    assert mask.shape == (300, 451)
    _on_text(mask, gt)


def _text_frame(base: Image.Image, xy: tuple[int, int], text: str, fill: tuple[int, int, int]) -> tuple[Image.Image, np.ndarray]:
    im = base.copy()
    d = ImageDraw.Draw(im)
    f = ImageFont.load_default(size=36)
    d.text(xy, text, fill=fill, font=f)
    x0, y0, x1, y1 = d.textbbox(xy, text, font=f)
    gt = np.zeros((im.size[1], im.size[0]), bool)
    gt[max(0, y0 - 4) : y1 + 4, max(0, x0 - 4) : x1 + 4] = True
    return im, gt


ANIMATIONS = ["GIF", "WEBP", "PNG"]


@pytest.mark.parametrize("fmt", ANIMATIONS)
def test_animation_answers_frame_zero_only(stack, fmt: str) -> None:
    """Two orders of the same two frames: each mask lies on its own frame 0's text and not on the other frame's."""
    base = photo("chelsea.png")
    top, gt_top = _text_frame(base, (20, 20), "HELLO WORLD 42", (255, 255, 255))
    bottom, gt_bottom = _text_frame(base, (40, 230), "Trifecta cat", (0, 0, 0))
    for first, second, gt_first, gt_second in ((top, bottom, gt_top, gt_bottom), (bottom, top, gt_bottom, gt_top)):
        data = png_bytes(first, fmt, save_all=True, append_images=[second, second], duration=100, loop=0)
        assert Image.open(io.BytesIO(data)).n_frames >= 2
        mask = _mask(stack, data, f"image/{fmt.lower()}")
        assert mask.shape == (300, 451)
        _on_text(mask, gt_first)
        assert mask[gt_second].mean() < 0.01, "frame 1's text must not show"


# ------------------------------------------------------------------ WebDataset tars on the sync endpoint
def _member(tf: tarfile.TarFile, name: str, data: bytes = b"", **kw: object) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    for k, v in kw.items():
        setattr(ti, k, v)
    tf.addfile(ti, io.BytesIO(data) if data else None)


def _tar(build: Callable[[tarfile.TarFile], None]) -> bytes:
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=tarfile.PAX_FORMAT) as tf:
        build(tf)
    return bio.getvalue()


# name → (expected error code or None for a good sample); the tar holds them in this order
TAR_MEMBERS: list[tuple[str, str | None]] = [
    ("good0.png", None),
    ("../traversal.png", "unprocessable"),
    ("/absolute.png", "unprocessable"),
    ("a/../../up.png", "unprocessable"),
    ("symlink.png", "unprocessable"),
    ("hardlink.png", "unprocessable"),
    ("chardev.png", "unprocessable"),
    ("blockdev.png", "unprocessable"),
    ("fifo.png", "unprocessable"),
    ("huge.png", "unprocessable"),
    ("empty.png", "undecodable_image"),
    ("bomb.png", "image_too_large"),
    ("truncated.jpg", "undecodable_image"),
    ("notes.txt", "unprocessable"),
    ("名前.png", None),
    ("comma,new\nline.png", None),
    ("good1.png", None),
]


def _hostile_tar() -> bytes:
    good, _ = with_text("chelsea.png")

    def build(tf: tarfile.TarFile) -> None:
        for name, _code in TAR_MEMBERS:
            stem = name.rsplit(".", 1)[0]
            if stem == "symlink":
                _member(tf, name, type=tarfile.SYMTYPE, linkname="/etc/passwd")
            elif stem == "hardlink":
                _member(tf, name, type=tarfile.LNKTYPE, linkname="good0.png")
            elif stem in ("chardev", "blockdev"):
                _member(tf, name, type=tarfile.CHRTYPE if stem == "chardev" else tarfile.BLKTYPE, devmajor=1, devminor=3)
            elif stem == "fifo":
                _member(tf, name, type=tarfile.FIFOTYPE)
            elif stem == "huge":
                _member(tf, name, b"\0" * (MEMBER_LIMIT + 1))
            elif stem == "empty":
                _member(tf, name, b"")
            elif stem == "bomb":
                _member(tf, name, raw_png(10000, 10000, 1, 0))
            elif stem == "truncated":
                _member(tf, name, jpeg()[: len(jpeg()) // 2])
            elif stem in ("good0", "good1"):
                _member(tf, name, good)
            else:
                _member(tf, name, small_png() if name.endswith(".png") else b"just text")

    return _tar(build)


@pytest.mark.parametrize("fmt", ["packbits", "rle"])
def test_tar_with_hostile_members_answers_the_good_samples(stack, fmt: str) -> None:
    r = httpx.post(stack.url + f"/run_textmask?format={fmt}", content=_hostile_tar(), headers={"Content-Type": "application/x-tar"}, timeout=60)
    assert r.status_code == 200, r.text
    n = len(TAR_MEMBERS)
    assert r.headers["x-batch-size"] == str(n)
    keys = [unquote(k) for k in r.headers["x-sample-keys"].split(",")]
    assert keys == [name.rsplit(".", 1)[0] for name, _ in TAR_MEMBERS]
    errors = json.loads(r.headers["x-sample-errors"])
    assert [(e["index"], e["code"]) for e in errors] == [(i, code) for i, (_, code) in enumerate(TAR_MEMBERS) if code]
    _, gt = with_text("chelsea.png")
    if fmt == "packbits":
        entries = codecs.decode_batch(r.content)
        masks = [codecs.decode_packbits(e) if e else None for e in entries]
    else:
        body = r.json()
        assert body["keys"] == keys and [e["code"] for e in body["errors"]] == [e["code"] for e in errors]
        masks = [codecs.decode_rle(m) if m else None for m in body["masks"]]
    assert len(masks) == n
    for i, (name, code) in enumerate(TAR_MEMBERS):
        if code:
            assert masks[i] is None or masks[i].size == 0, f"{name} must be a zero-length entry"
        elif name.startswith("good"):
            assert masks[i].shape == (300, 451)
            _on_text(masks[i], gt)
        else:
            assert masks[i].shape == (48, 64), name
    still_serves(stack)


def test_tar_over_sync_batch_is_413_and_points_to_jobs(stack) -> None:
    data = _tar(lambda tf: [_member(tf, f"s{i}.png", small_png()) for i in range(SYNC_BATCH + 1)])
    r = httpx.post(stack.url + TM, content=data, headers={"Content-Type": "application/x-tar"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_samples" and "/v1/jobs" in r.json()["error"]["message"]
    still_serves(stack)


def test_tar_truncated_mid_member_keeps_the_samples_before(stack) -> None:
    data = _tar(lambda tf: [_member(tf, "a.png", small_png()), _member(tf, "b.png", small_png()), _member(tf, "c.png", b"\0" * 200_000)])
    cut = data[: len(data) - 150_000]
    r = httpx.post(stack.url + TM, content=cut, headers={"Content-Type": "application/x-tar"}, timeout=30)
    assert r.status_code == 200, r.text
    errors = json.loads(r.headers["x-sample-errors"])
    assert r.headers["x-sample-keys"] == "a,b,c,__tar__"
    assert [(e["key"], e["code"]) for e in errors] == [("c", "unprocessable"), ("__tar__", "unprocessable")]
    entries = codecs.decode_batch(r.content)
    assert [codecs.decode_packbits(e).shape for e in entries[:2]] == [(48, 64), (48, 64)] and entries[2:] == [b"", b""]
    still_serves(stack)


def test_tar_member_declaring_10_gb_is_refused_without_reading(stack) -> None:
    """A member header claiming 10 GB (the body is small): refused from the header, earlier samples answered."""

    def build(tf: tarfile.TarFile) -> None:
        _member(tf, "ok.png", small_png())
        ti = tarfile.TarInfo("liar.png")
        ti.size = 10 << 30
        tf.fileobj.write(ti.tobuf(tf.format, tf.encoding, tf.errors))  # the header alone: no 10 GB follow

    r = httpx.post(stack.url + TM, content=_tar(build), headers={"Content-Type": "application/x-tar"}, timeout=30)
    assert r.status_code == 200, r.text
    errors = json.loads(r.headers["x-sample-errors"])
    assert errors[0]["key"] == "liar" and errors[0]["code"] == "unprocessable" and "MAX_SAMPLE_BYTES" in errors[0]["message"]
    entries = codecs.decode_batch(r.content)
    assert codecs.decode_packbits(entries[0]).shape == (48, 64) and all(e == b"" for e in entries[1:])
    still_serves(stack)


def test_tar_with_long_member_names_keeps_headers_small(stack) -> None:
    """Twelve 1000-character names: the key list would pass 8 KiB, so only indexes and codes go in headers."""
    data = _tar(lambda tf: [_member(tf, f"{i:02d}" + "n" * 1000 + ".png", small_png() if i else b"") for i in range(12)])
    r = httpx.post(stack.url + TM, content=data, headers={"Content-Type": "application/x-tar"}, timeout=60)
    assert r.status_code == 200, r.text
    assert "x-sample-keys" not in r.headers and "format=rle" in r.headers["x-sample-keys-omitted"]
    assert json.loads(r.headers["x-sample-errors"]) == [{"index": 0, "code": "undecodable_image"}]
    assert sum(len(k) + len(v) for k, v in r.headers.items()) < 9000
    entries = codecs.decode_batch(r.content)
    assert entries[0] == b"" and all(codecs.decode_packbits(e).shape == (48, 64) for e in entries[1:])


# every hostile input these tests send: the table, colour modes, EXIF, animations (two orders each),
# tar members (+ the over-batch, truncated, 10 GB and long-name tars), URIs
INPUTS_TRIED = len(CASES) + len(MODES) + len(ORIENTATIONS) + len(ANIMATIONS) * 2 + len(TAR_MEMBERS) + 4 + 2 + 1


def test_inputs_tried_is_what_docs_security_md_says() -> None:
    """docs/security.md's count of hostile inputs, and each row of its table, are these tests' own."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "security.md").read_text()
    said = re.search(r"`tests/test_hostile\.py` sends (\d+) hostile inputs", doc)
    assert said and int(said.group(1)) == INPUTS_TRIED
    section = doc[doc.index("## What the tests try") :]
    rows = [int(m.group(1)) for m in re.finditer(r"^\|[^|\n]+\| (\d+) \|$", section, re.M)]
    want = [len(CASES), len(MODES), len(ORIENTATIONS), len(ANIMATIONS) * 2, len(TAR_MEMBERS), 4, 2, 1]
    assert rows == want and sum(rows) == INPUTS_TRIED
    assert f"The {len(CASES)} table cases cover" in doc
