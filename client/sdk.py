"""A typed Python client for Trifecta (sync and async, on httpx) that returns numpy masks.

    from client.sdk import Client
    with Client("http://127.0.0.1:8080") as c:
        mask = c.textmask(open("photo.jpg", "rb").read())       # H x W bool array
        job = c.submit_image("textmask", "photo.jpg")            # {"job_id", ...}
        c.wait(job["job_id"]); mask = c.fetch_mask(job["job_id"])
"""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from storage import codecs


class TrifectaClientError(RuntimeError):
    def __init__(self, status: int, body: Any) -> None:
        err = body.get("error", {}) if isinstance(body, dict) else {}
        super().__init__(f"{status} {err.get('code', '')}: {err.get('message', body)}")
        self.status, self.body, self.code = status, body, err.get("code")


def _check(r: httpx.Response) -> httpx.Response:
    if r.status_code >= 400:
        try:
            body = r.json()
        except ValueError:
            body = r.text
        raise TrifectaClientError(r.status_code, body)
    return r


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _img_type(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def decode_mask_response(r: httpx.Response) -> np.ndarray | list[np.ndarray | None]:
    fmt = r.headers.get("x-mask-format", "packbits")
    n = int(r.headers.get("x-batch-size", "1"))
    if fmt == "png":
        return codecs.decode_png(r.content)
    if fmt == "rle":
        body = r.json()
        if "masks" in body:
            return [codecs.decode_rle(m) if m else None for m in body["masks"]]
        return codecs.decode_rle(body)
    if "x-sample-keys" in r.headers:  # a tar batch
        return [codecs.decode_packbits(b) if b else None for b in codecs.decode_batch(r.content)][:n]
    return codecs.decode_packbits(r.content)


class Client:
    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 60.0) -> None:
        self.url = (url or os.environ.get("TRIFECTA_URL") or "http://127.0.0.1:8080").rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=_headers(api_key or os.environ.get("TRIFECTA_API_KEY")), timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # sync masks
    def run(self, model: str, image: bytes, fmt: str = "packbits", timeout: float | None = None) -> np.ndarray:
        params: dict[str, Any] = {"format": fmt}
        if timeout:
            params["timeout"] = timeout
        r = _check(self.http.post(f"/run_{model}", content=image, params=params, headers={"Content-Type": _img_type(image)}))
        if r.status_code == 204:
            raise TrifectaClientError(204, {"error": {"code": "no_model", "message": f"{model} has no model configured"}})
        return decode_mask_response(r)  # type: ignore[return-value]

    def textmask(self, image: bytes, **kw: Any) -> np.ndarray:
        return self.run("textmask", image, **kw)

    def segmentation(self, image: bytes, **kw: Any) -> np.ndarray:
        return self.run("segmentation", image, **kw)

    def run_tar(self, model: str, tar: bytes) -> list[np.ndarray | None]:
        r = _check(self.http.post(f"/run_{model}", content=tar, headers={"Content-Type": "application/x-tar"}))
        return decode_mask_response(r)  # type: ignore[return-value]

    # jobs
    def submit_image(self, model: str, path_or_bytes: str | Path | bytes, params: dict[str, Any] | None = None, idempotency_key: str | None = None, callback_url: str | None = None) -> dict[str, Any]:
        data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
        body = {"model": model, "input": {"image": base64.b64encode(data).decode()}, "params": params or {}}
        if callback_url:
            body["callback_url"] = callback_url
        return self.submit(body, idempotency_key)

    def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        h = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return _check(self.http.post("/v1/jobs", json=body, headers=h)).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return _check(self.http.get(f"/v1/jobs/{job_id}")).json()

    def jobs(self, limit: int = 20, offset: int = 0) -> dict[str, Any]:
        return _check(self.http.get("/v1/jobs", params={"limit": limit, "offset": offset})).json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return _check(self.http.delete(f"/v1/jobs/{job_id}")).json()

    def wait(self, job_id: str, timeout: float = 300, poll: float = 0.2) -> dict[str, Any]:
        t_end = time.monotonic() + timeout
        while True:
            j = self.job(job_id)
            if j["status"] in ("succeeded", "failed", "cancelled", "expired"):
                return j
            if time.monotonic() > t_end:
                raise TimeoutError(f"job {job_id} still {j['status']} after {timeout}s")
            time.sleep(poll)

    def fetch(self, job_id: str, key: str | None = None) -> bytes:
        return _check(self.http.get(f"/v1/jobs/{job_id}/result", params={"key": key} if key else None)).content

    def fetch_mask(self, job_id: str, key: str | None = None) -> np.ndarray:
        r = _check(self.http.get(f"/v1/jobs/{job_id}/result", params={"key": key} if key else None))
        return codecs.decode(r.content, r.headers.get("x-mask-format", "packbits"))

    def health(self) -> dict[str, Any]:
        return self.http.get("/health").json()


class AsyncClient:
    """The same calls with `await`."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 60.0, limits: httpx.Limits | None = None) -> None:
        self.url = (url or os.environ.get("TRIFECTA_URL") or "http://127.0.0.1:8080").rstrip("/")
        self.http = httpx.AsyncClient(base_url=self.url, headers=_headers(api_key or os.environ.get("TRIFECTA_API_KEY")), timeout=timeout, limits=limits or httpx.Limits(max_connections=1000, max_keepalive_connections=1000))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def run(self, model: str, image: bytes, fmt: str = "packbits") -> np.ndarray:
        r = _check(await self.http.post(f"/run_{model}", content=image, params={"format": fmt}, headers={"Content-Type": _img_type(image)}))
        return decode_mask_response(r)  # type: ignore[return-value]

    async def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        h = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return _check(await self.http.post("/v1/jobs", json=body, headers=h)).json()

    async def job(self, job_id: str) -> dict[str, Any]:
        return _check(await self.http.get(f"/v1/jobs/{job_id}")).json()

    async def fetch_mask(self, job_id: str, key: str | None = None) -> np.ndarray:
        r = _check(await self.http.get(f"/v1/jobs/{job_id}/result", params={"key": key} if key else None))
        return codecs.decode(r.content, r.headers.get("x-mask-format", "packbits"))
