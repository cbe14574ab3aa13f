"""The SDK's two clients: `Client` (blocking) and `AsyncClient` (awaited), the same calls on one `_Call` description each."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from client.sdk.core import (
    TERMINAL,
    VIDEO,
    ClipResult,
    Fetched,
    ImageInput,
    MaskResult,
    Sam3Result,
    T,
    _b64,
    _base_url,
    _Call,
    _Calls,
    _check,
    _close_files,
    _frame_b64,
    _headers,
    _health_ok,
    _key,
)


# ---------------------------------------------------------------- the sync client
class Client:
    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 60.0, transport: httpx.BaseTransport | None = None) -> None:
        self.url = _base_url(url)
        self.http = httpx.Client(base_url=self.url, headers=_headers(_key(api_key)), timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _do(self, c: _Call[T]) -> T:
        try:
            return c.parse(_check(self.http.request(c.method, c.url, **c.kw)))
        finally:
            _close_files(c)

    # sync masks
    def run(self, model: str, image: ImageInput, fmt: str = "packbits", timeout: float | None = None) -> np.ndarray:
        """One image through `/run_<model>` → its H x W bool mask."""
        return self._do(_Calls.run(model, image, fmt, timeout)).mask

    def run_timed(self, model: str, image: ImageInput, fmt: str = "packbits", timeout: float | None = None) -> MaskResult:
        """Like `run`, with the queue/model times and worker the service reported."""
        return self._do(_Calls.run(model, image, fmt, timeout))

    def run_tar(self, model: str, tar: bytes, fmt: str = "packbits") -> list[np.ndarray | None]:
        """A small WebDataset tar in one request → a mask per sample, in the tar's order (None = that sample failed)."""
        return self._do(_Calls.run_tar(model, tar, fmt))

    # jobs
    def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        return self._do(_Calls.submit(body, idempotency_key))

    def submit_image(self, model: str, image: ImageInput, params: dict[str, Any] | None = None, idempotency_key: str | None = None, callback_url: str | None = None) -> dict[str, Any]:
        return self.submit(_Calls.job_body(model, {"image": _b64(image)}, params, callback_url), idempotency_key)

    def submit_uri(self, model: str, uri: str, params: dict[str, Any] | None = None, idempotency_key: str | None = None, callback_url: str | None = None) -> dict[str, Any]:
        return self.submit(_Calls.job_body(model, {"uri": uri}, params, callback_url), idempotency_key)

    def submit_shards(self, model: str, shards: Sequence[str] | str, params: dict[str, Any] | None = None, idempotency_key: str | None = None, callback_url: str | None = None) -> dict[str, Any]:
        """WebDataset shard URIs (brace patterns like `s3://b/shard-{000..099}.tar` allowed)."""
        return self.submit(_Calls.job_body(model, {"shards": [shards] if isinstance(shards, str) else list(shards)}, params, callback_url), idempotency_key)

    def upload_shard(self, model: str, path: str | Path, params: dict[str, Any] | None = None, callback_url: str | None = None, idempotency_key: str | None = None) -> dict[str, Any]:
        """One local shard streamed up as a multipart file."""
        return self._do(_Calls.upload(model, "shard", path, params, callback_url, idempotency_key))

    def submit_video(self, path_or_uri: str | Path, params: dict[str, Any] | None = None, callback_url: str | None = None, model: str = "vjepa2") -> dict[str, Any]:
        """A whole video classified clip by clip: an `s3://`/`file://` URI, or a local file uploaded."""
        s = str(path_or_uri)
        if s.startswith(("s3://", "file://")):
            return self.submit(_Calls.job_body(model, {"video": s}, params, callback_url))
        return self._do(_Calls.upload(model, "video", path_or_uri, params, callback_url, None))

    def submit_frames(self, frames: Sequence[bytes | np.ndarray], width: int, height: int, fmt: str = "BGR", params: dict[str, Any] | None = None, callback_url: str | None = None) -> dict[str, Any]:
        """One or more 16-frame clips as a job (poll it or get a webhook)."""
        inp = {"frames": [_frame_b64(f) for f in frames], "width": width, "height": height, "format": fmt}
        return self.submit(_Calls.job_body("vjepa2", inp, params, callback_url))

    def job(self, job_id: str) -> dict[str, Any]:
        return self._do(_Calls.job(job_id))

    def jobs(self, limit: int = 20, offset: int = 0) -> dict[str, Any]:
        return self._do(_Calls.jobs(limit, offset))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._do(_Calls.cancel(job_id))

    def wait(self, job_id: str, timeout: float = 300, poll: float = 0.2, on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the job is final; `on_progress(status)` is called on every poll."""
        t_end = time.monotonic() + timeout
        while True:
            j = self.job(job_id)
            if on_progress:
                on_progress(j)
            if j["status"] in TERMINAL:
                return j
            if time.monotonic() > t_end:
                raise TimeoutError(f"job {job_id} still {j['status']} after {timeout}s")
            time.sleep(poll)

    def fetch(self, job_id: str, key: str | None = None) -> bytes:
        return self._do(_Calls.fetch(job_id, key))

    def fetch_output(self, job_id: str, key: str | None = None) -> Fetched:
        """A job's output bytes with the format the service stored it in (`packbits`, `png`, `rle`, `json` …)."""
        return self._do(_Calls.fetch_output(job_id, key))

    def fetch_mask(self, job_id: str, key: str | None = None) -> np.ndarray:
        return self._do(_Calls.fetch_mask(job_id, key))

    # SAM3
    def sam3_segment(self, image: ImageInput, prompts: Sequence[str | dict[str, Any]] | None = None, *, text: str | None = None, boxes: Sequence[Sequence[float]] | None = None, confidence_threshold: float | None = None) -> Sam3Result:
        """Text and/or box prompts (`boxes`: [cx, cy, w, h(, positive)] normalised) → a mask per object."""
        return self._do(_Calls.sam3_segment(image, prompts, text, boxes, confidence_threshold))

    def sam3_cached_features(self, image: ImageInput, text_prompts: Sequence[str], confidence_threshold: float | None = None) -> Sam3Result:
        """Many text prompts on one image: the vision encoder runs once (and stays cached on its worker)."""
        return self._do(_Calls.sam3_cached_features(image, text_prompts, confidence_threshold))

    # V-JEPA 2
    def vjepa2_infer(self, frames: Sequence[bytes | np.ndarray], width: int | None = None, height: int | None = None, fmt: str = "BGR") -> ClipResult:
        """One clip (16 frames: JPEG/PNG bytes or H x W x 3 uint8 arrays in `fmt` order) → top-k labels."""
        return self._do(_Calls.vjepa2_infer(frames, width, height, fmt))

    # Mask2Former
    def m2f_segment(self, image: ImageInput, mask: str = "wall", model: str | None = None) -> np.ndarray:
        """One class (`wall`, `floor`, …) → its mask at the image's size."""
        return self._do(_Calls.m2f_segment(image, mask, model)).mask

    def m2f_segment_batch(self, image: ImageInput, classes: Iterable[str] | str | None = None, model: str | None = None) -> dict[str, np.ndarray]:
        """Several classes from ONE inference (default wall, floor, ceiling, window; `"all"` for every class present)."""
        return self._do(_Calls.m2f_segment_batch(image, classes, model))

    # operations
    # SAM3 video sessions: every call after start goes to the worker holding the session
    def video_start(self, video_path: str, session_id: str | None = None) -> dict[str, Any]:
        """A session on a video already on the server (under ALLOWED_INPUT_ROOTS)."""
        return self._do(_Calls.video_start(video_path, session_id))

    def video_upload(self, path: str | Path, session_id: str | None = None) -> dict[str, Any]:
        """Upload a video and start a session on it (the upload is deleted when it closes)."""
        return self._do(_Calls.video_upload(path, session_id))

    def video_prompt(self, session_id: str, frame_index: int, prompts: Sequence[str | dict[str, Any]], obj_id: int | None = None) -> dict[str, Any]:
        return self._do(_Calls.video_prompt(session_id, frame_index, prompts, obj_id))

    def video_propagate(self, session_id: str, direction: str = "forward", start_frame_index: int | None = None, max_frames: int | None = None) -> dict[str, Any]:
        """`results` keyed by frame index; decode masks with `storage.codecs.decode_rle`."""
        return self._do(_Calls.video_propagate(session_id, direction, start_frame_index, max_frames))

    def video_status(self, session_id: str) -> dict[str, Any]:
        return self._do(_Calls.video_session("GET", session_id, "/status"))

    def video_reset(self, session_id: str) -> dict[str, Any]:
        return self._do(_Calls.video_session("POST", session_id, "/reset"))

    def video_remove_object(self, session_id: str, obj_id: int) -> dict[str, Any]:
        return self._do(_Calls.video_session("DELETE", session_id, f"/object/{obj_id}"))

    def video_close(self, session_id: str) -> dict[str, Any]:
        return self._do(_Calls.video_session("DELETE", session_id))

    def video_sessions(self) -> dict[str, Any]:
        return self._do(_Calls.get_json(f"{VIDEO}/sessions"))

    def health(self) -> dict[str, Any]:
        return _health_ok(self.http.get("/health")).json()

    def models_info(self) -> dict[str, Any]:
        return self._do(_Calls.get_json("/models/info"))["models"]

    def service_info(self) -> dict[str, Any]:
        return self._do(_Calls.get_json("/"))

    def metrics(self) -> str:
        return self._do(_Calls.metrics())


# ---------------------------------------------------------------- the async client
class AsyncClient:
    """The same calls with `await`."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 60.0, limits: httpx.Limits | None = None, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = _base_url(url)
        self.http = httpx.AsyncClient(
            base_url=self.url, headers=_headers(_key(api_key)), timeout=timeout,
            limits=limits or httpx.Limits(max_connections=1000, max_keepalive_connections=1000), transport=transport,
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _do(self, c: _Call[T]) -> T:
        try:
            return c.parse(_check(await self.http.request(c.method, c.url, **c.kw)))
        finally:
            _close_files(c)

    async def run(self, model: str, image: ImageInput, fmt: str = "packbits", timeout: float | None = None) -> np.ndarray:
        return (await self._do(_Calls.run(model, image, fmt, timeout))).mask

    async def run_timed(self, model: str, image: ImageInput, fmt: str = "packbits", timeout: float | None = None) -> MaskResult:
        return await self._do(_Calls.run(model, image, fmt, timeout))

    async def run_tar(self, model: str, tar: bytes, fmt: str = "packbits") -> list[np.ndarray | None]:
        return await self._do(_Calls.run_tar(model, tar, fmt))

    async def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        return await self._do(_Calls.submit(body, idempotency_key))

    async def submit_image(self, model: str, image: ImageInput, params: dict[str, Any] | None = None, idempotency_key: str | None = None, callback_url: str | None = None) -> dict[str, Any]:
        return await self.submit(_Calls.job_body(model, {"image": _b64(image)}, params, callback_url), idempotency_key)

    async def submit_uri(self, model: str, uri: str, params: dict[str, Any] | None = None, idempotency_key: str | None = None, callback_url: str | None = None) -> dict[str, Any]:
        return await self.submit(_Calls.job_body(model, {"uri": uri}, params, callback_url), idempotency_key)

    async def submit_shards(self, model: str, shards: Sequence[str] | str, params: dict[str, Any] | None = None, idempotency_key: str | None = None, callback_url: str | None = None) -> dict[str, Any]:
        return await self.submit(_Calls.job_body(model, {"shards": [shards] if isinstance(shards, str) else list(shards)}, params, callback_url), idempotency_key)

    async def upload_shard(self, model: str, path: str | Path, params: dict[str, Any] | None = None, callback_url: str | None = None, idempotency_key: str | None = None) -> dict[str, Any]:
        return await self._do(_Calls.upload(model, "shard", path, params, callback_url, idempotency_key))

    async def submit_video(self, path_or_uri: str | Path, params: dict[str, Any] | None = None, callback_url: str | None = None, model: str = "vjepa2") -> dict[str, Any]:
        s = str(path_or_uri)
        if s.startswith(("s3://", "file://")):
            return await self.submit(_Calls.job_body(model, {"video": s}, params, callback_url))
        return await self._do(_Calls.upload(model, "video", path_or_uri, params, callback_url, None))

    async def submit_frames(self, frames: Sequence[bytes | np.ndarray], width: int, height: int, fmt: str = "BGR", params: dict[str, Any] | None = None, callback_url: str | None = None) -> dict[str, Any]:
        inp = {"frames": [_frame_b64(f) for f in frames], "width": width, "height": height, "format": fmt}
        return await self.submit(_Calls.job_body("vjepa2", inp, params, callback_url))

    async def job(self, job_id: str) -> dict[str, Any]:
        return await self._do(_Calls.job(job_id))

    async def jobs(self, limit: int = 20, offset: int = 0) -> dict[str, Any]:
        return await self._do(_Calls.jobs(limit, offset))

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return await self._do(_Calls.cancel(job_id))

    async def wait(self, job_id: str, timeout: float = 300, poll: float = 0.2, on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        t_end = time.monotonic() + timeout
        while True:
            j = await self.job(job_id)
            if on_progress:
                on_progress(j)
            if j["status"] in TERMINAL:
                return j
            if time.monotonic() > t_end:
                raise TimeoutError(f"job {job_id} still {j['status']} after {timeout}s")
            await asyncio.sleep(poll)

    async def fetch(self, job_id: str, key: str | None = None) -> bytes:
        return await self._do(_Calls.fetch(job_id, key))

    async def fetch_output(self, job_id: str, key: str | None = None) -> Fetched:
        return await self._do(_Calls.fetch_output(job_id, key))

    async def fetch_mask(self, job_id: str, key: str | None = None) -> np.ndarray:
        return await self._do(_Calls.fetch_mask(job_id, key))

    async def sam3_segment(self, image: ImageInput, prompts: Sequence[str | dict[str, Any]] | None = None, *, text: str | None = None, boxes: Sequence[Sequence[float]] | None = None, confidence_threshold: float | None = None) -> Sam3Result:
        return await self._do(_Calls.sam3_segment(image, prompts, text, boxes, confidence_threshold))

    async def sam3_cached_features(self, image: ImageInput, text_prompts: Sequence[str], confidence_threshold: float | None = None) -> Sam3Result:
        return await self._do(_Calls.sam3_cached_features(image, text_prompts, confidence_threshold))

    async def vjepa2_infer(self, frames: Sequence[bytes | np.ndarray], width: int | None = None, height: int | None = None, fmt: str = "BGR") -> ClipResult:
        return await self._do(_Calls.vjepa2_infer(frames, width, height, fmt))

    async def m2f_segment(self, image: ImageInput, mask: str = "wall", model: str | None = None) -> np.ndarray:
        return (await self._do(_Calls.m2f_segment(image, mask, model))).mask

    async def m2f_segment_batch(self, image: ImageInput, classes: Iterable[str] | str | None = None, model: str | None = None) -> dict[str, np.ndarray]:
        return await self._do(_Calls.m2f_segment_batch(image, classes, model))

    # SAM3 video sessions: every call after start goes to the worker holding the session
    async def video_start(self, video_path: str, session_id: str | None = None) -> dict[str, Any]:
        """A session on a video already on the server (under ALLOWED_INPUT_ROOTS)."""
        return await self._do(_Calls.video_start(video_path, session_id))

    async def video_upload(self, path: str | Path, session_id: str | None = None) -> dict[str, Any]:
        """Upload a video and start a session on it (the upload is deleted when it closes)."""
        return await self._do(_Calls.video_upload(path, session_id))

    async def video_prompt(self, session_id: str, frame_index: int, prompts: Sequence[str | dict[str, Any]], obj_id: int | None = None) -> dict[str, Any]:
        return await self._do(_Calls.video_prompt(session_id, frame_index, prompts, obj_id))

    async def video_propagate(self, session_id: str, direction: str = "forward", start_frame_index: int | None = None, max_frames: int | None = None) -> dict[str, Any]:
        """`results` keyed by frame index; decode masks with `storage.codecs.decode_rle`."""
        return await self._do(_Calls.video_propagate(session_id, direction, start_frame_index, max_frames))

    async def video_status(self, session_id: str) -> dict[str, Any]:
        return await self._do(_Calls.video_session("GET", session_id, "/status"))

    async def video_reset(self, session_id: str) -> dict[str, Any]:
        return await self._do(_Calls.video_session("POST", session_id, "/reset"))

    async def video_remove_object(self, session_id: str, obj_id: int) -> dict[str, Any]:
        return await self._do(_Calls.video_session("DELETE", session_id, f"/object/{obj_id}"))

    async def video_close(self, session_id: str) -> dict[str, Any]:
        return await self._do(_Calls.video_session("DELETE", session_id))

    async def video_sessions(self) -> dict[str, Any]:
        return await self._do(_Calls.get_json(f"{VIDEO}/sessions"))

    async def health(self) -> dict[str, Any]:
        return _health_ok(await self.http.get("/health")).json()

    async def models_info(self) -> dict[str, Any]:
        return (await self._do(_Calls.get_json("/models/info")))["models"]

    async def service_info(self) -> dict[str, Any]:
        return await self._do(_Calls.get_json("/"))

    async def metrics(self) -> str:
        return await self._do(_Calls.metrics())


# ---------------------------------------------------------------- per-model shortcuts
def _shortcuts(models: Iterable[str]) -> None:
    """`Client.<model>(image, **kw)` = `run(model, image, **kw)` for each model whose ModelSpec says `sdk=True`."""
    for m in models:
        if hasattr(Client, m) or hasattr(AsyncClient, m):
            raise ValueError(f"model {m!r} would hide the SDK method of that name; declare it with sdk=False")

        def call(self: Client, image: ImageInput, _m: str = m, **kw: Any) -> np.ndarray:
            return self.run(_m, image, **kw)

        async def acall(self: AsyncClient, image: ImageInput, _m: str = m, **kw: Any) -> np.ndarray:
            return await self.run(_m, image, **kw)

        for cls, fn in ((Client, call), (AsyncClient, acall)):
            fn.__name__ = fn.__qualname__ = m
            fn.__doc__ = f"One image through `/run_{m}` → its H x W bool mask (`run({m!r}, image, **kw)`)."
            setattr(cls, m, fn)


def _sdk_models() -> tuple[str, ...]:
    from tasks.models import MODELS, sdk_models

    return sdk_models(MODELS.values())


_shortcuts(_sdk_models())
