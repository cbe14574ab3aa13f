"""The SDK's shared half: errors, typed results, answer decoding and one `_Call` description per endpoint."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx
import numpy as np

from storage import codecs
from tasks.keys import TERMINAL  # noqa: F401 - the one terminal set, re-exported (tasks/keys.py imports nothing)

T = TypeVar("T")
ImageInput = bytes | str | Path


class TrifectaClientError(RuntimeError):
    """An error answer: `.status` (HTTP), `.code` (the service's error code), `.body`."""

    def __init__(self, status: int, body: Any) -> None:
        err = body.get("error", {}) if isinstance(body, dict) else {}
        super().__init__(f"{status} {err.get('code', '')}: {err.get('message', body)}")
        self.status, self.body, self.code = status, body, err.get("code")


# ---------------------------------------------------------------- typed results
@dataclass
class Fetched:
    """A job's output as stored: its bytes, format (`X-Mask-Format`) and content type."""

    data: bytes
    format: str | None
    content_type: str


@dataclass
class Timing:
    queue_ms: float | None = None
    model_ms: float | None = None
    worker: str | None = None
    job_id: str | None = None

    @classmethod
    def of(cls, r: httpx.Response) -> Timing:
        def f(name: str) -> float | None:
            v = r.headers.get(name)
            try:
                return float(v) if v not in (None, "") else None
            except ValueError:
                return None

        return cls(f("x-queue-ms"), f("x-model-ms"), r.headers.get("x-worker") or None, r.headers.get("x-job-id") or None)


@dataclass
class MaskResult:
    """A sync mask call's answer: the mask and where the time went."""

    mask: np.ndarray
    timing: Timing


@dataclass
class Sam3Instances:
    """One SAM3 query's objects: a mask per object (H x W bool), boxes [cx, cy, w, h] normalised, scores."""

    prompt: str | None
    masks: list[np.ndarray]
    boxes: list[list[float]]
    scores: list[float]


@dataclass
class Sam3Result:
    instances: list[Sam3Instances]
    image_size: Any = None
    inference_time_ms: float = 0.0
    cache_hit: bool = False
    timing: Timing = field(default_factory=Timing)

    @property
    def masks(self) -> list[np.ndarray]:
        return [m for i in self.instances for m in i.masks]

    @property
    def scores(self) -> list[float]:
        return [s for i in self.instances for s in i.scores]


@dataclass
class Prediction:
    label: str
    confidence: float


@dataclass
class ClipResult:
    predictions: list[Prediction]
    clip_id: str
    timing: Timing


# ---------------------------------------------------------------- decoding
def decode_mask_response(r: httpx.Response) -> np.ndarray | list[np.ndarray | None]:
    """A `/run_*` answer → one mask, or a list for a tar batch (None for a failed sample)."""
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


def _bytes(x: ImageInput) -> bytes:
    return x if isinstance(x, bytes) else Path(x).read_bytes()


def _b64(x: ImageInput) -> str:
    return base64.b64encode(_bytes(x)).decode("ascii")


def _frame_b64(f: bytes | np.ndarray) -> str:
    """A frame: encoded bytes (JPEG/PNG) as they are, or an H x W x 3 uint8 array as raw pixels."""
    if isinstance(f, np.ndarray):
        if f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3:
            raise ValueError(f"a frame array must be H x W x 3 uint8, got {f.shape} {f.dtype}")
        return base64.b64encode(np.ascontiguousarray(f).tobytes()).decode("ascii")
    return base64.b64encode(f).decode("ascii")


def _no_mask(model: str) -> TrifectaClientError:
    return TrifectaClientError(204, {"error": {"code": "no_model", "message": f"{model} has no model configured"}})


def _sam3(r: httpx.Response) -> Sam3Result:
    b = r.json()
    hit = r.headers.get("x-cache-hit") == "true" or bool(b.get("cache_hit"))
    if "results" in b:  # cached-features: one entry per text prompt
        inst = [Sam3Instances(x.get("prompt"), [codecs.decode_rle(m) for m in x["masks"]], x["boxes"], x["scores"]) for x in b["results"]]
    else:
        inst = [Sam3Instances(None, [codecs.decode_rle(m) for m in b["masks"]], b["boxes"], b["scores"])]
    return Sam3Result(inst, b.get("image_size"), float(b.get("inference_time_ms") or 0.0), hit, Timing.of(r))


def _m2f_batch(r: httpx.Response) -> dict[str, np.ndarray]:
    return {name: codecs.decode_png(base64.b64decode(png)) for name, png in r.json().items()}


def _clip(r: httpx.Response) -> ClipResult:
    b = r.json()
    return ClipResult([Prediction(p["label"], float(p["confidence"])) for p in b["predictions"]], b.get("clip_id", ""), Timing.of(r))


def _mask_result(model: str) -> Callable[[httpx.Response], MaskResult]:
    def parse(r: httpx.Response) -> MaskResult:
        if r.status_code == 204:
            raise _no_mask(model)
        return MaskResult(decode_mask_response(r), Timing.of(r))  # type: ignore[arg-type]

    return parse


def _json(r: httpx.Response) -> Any:
    return r.json()


# ---------------------------------------------------------------- one description per call
@dataclass
class _Call(Generic[T]):
    method: str
    url: str
    parse: Callable[[httpx.Response], T]
    kw: dict[str, Any] = field(default_factory=dict)


class _Calls:
    """What each endpoint takes and answers; both clients send these."""

    @staticmethod
    def run(model: str, image: ImageInput, fmt: str = "packbits", timeout: float | None = None) -> _Call[MaskResult]:
        data = _bytes(image)
        params: dict[str, Any] = {"format": fmt}
        if timeout:
            params["timeout"] = timeout
        return _Call("POST", f"/run_{model}", _mask_result(model), {"content": data, "params": params, "headers": {"Content-Type": _img_type(data)}})

    @staticmethod
    def run_tar(model: str, tar: bytes, fmt: str = "packbits") -> _Call[list[np.ndarray | None]]:
        ctype = "application/x-tar+gzip" if tar[:2] == b"\x1f\x8b" else "application/x-tar"
        return _Call("POST", f"/run_{model}", decode_mask_response, {"content": tar, "params": {"format": fmt}, "headers": {"Content-Type": ctype}})  # type: ignore[arg-type]

    @staticmethod
    def submit(body: dict[str, Any], idempotency_key: str | None = None) -> _Call[dict[str, Any]]:
        return _Call("POST", "/v1/jobs", _json, {"json": body, "headers": {"Idempotency-Key": idempotency_key} if idempotency_key else {}})

    @staticmethod
    def job_body(model: str, inp: dict[str, Any], params: dict[str, Any] | None, callback_url: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "input": inp, "params": params or {}}
        if callback_url:
            body["callback_url"] = callback_url
        return body

    @staticmethod
    def upload(model: str, kind: str, path: str | Path, params: dict[str, Any] | None, callback_url: str | None, idempotency_key: str | None) -> _Call[dict[str, Any]]:
        import orjson

        p = Path(path)
        data: dict[str, str] = {"model": model, "kind": kind, "params": orjson.dumps(params or {}).decode()}
        if callback_url:
            data["callback_url"] = callback_url
        h = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return _Call("POST", "/v1/jobs", _json, {"data": data, "files": {"file": (p.name, p.open("rb"), "application/octet-stream")}, "headers": h})

    @staticmethod
    def job(job_id: str) -> _Call[dict[str, Any]]:
        return _Call("GET", f"/v1/jobs/{job_id}", _json)

    @staticmethod
    def jobs(limit: int = 20, offset: int = 0) -> _Call[dict[str, Any]]:
        return _Call("GET", "/v1/jobs", _json, {"params": {"limit": limit, "offset": offset}})

    @staticmethod
    def cancel(job_id: str) -> _Call[dict[str, Any]]:
        return _Call("DELETE", f"/v1/jobs/{job_id}", _json)

    @staticmethod
    def fetch(job_id: str, key: str | None = None) -> _Call[bytes]:
        return _Call("GET", f"/v1/jobs/{job_id}/result", lambda r: r.content, {"params": {"key": key} if key else None})

    @staticmethod
    def fetch_output(job_id: str, key: str | None = None) -> _Call[Fetched]:
        return _Call("GET", f"/v1/jobs/{job_id}/result", lambda r: Fetched(r.content, r.headers.get("x-mask-format"), r.headers.get("content-type", "")), {"params": {"key": key} if key else None})

    @staticmethod
    def fetch_mask(job_id: str, key: str | None = None) -> _Call[np.ndarray]:
        return _Call("GET", f"/v1/jobs/{job_id}/result", lambda r: codecs.decode(r.content, r.headers.get("x-mask-format", "packbits")), {"params": {"key": key} if key else None})

    @staticmethod
    def sam3_segment(image: ImageInput, prompts: Sequence[str | dict[str, Any]] | None, text: str | None, boxes: Sequence[Sequence[float]] | None, confidence_threshold: float | None) -> _Call[Sam3Result]:
        ps: list[Any] = list(prompts or [])
        if text:
            ps.append({"type": "text", "text": text})
        ps += [{"type": "box", "box": list(b[:4]), "label": bool(b[4]) if len(b) > 4 else True} for b in boxes or []]
        body: dict[str, Any] = {"image": _b64(image), "prompts": ps}
        if confidence_threshold is not None:
            body["confidence_threshold"] = confidence_threshold
        return _Call("POST", "/api/v1/image/segment", _sam3, {"json": body})

    @staticmethod
    def sam3_cached_features(image: ImageInput, text_prompts: Sequence[str], confidence_threshold: float | None) -> _Call[Sam3Result]:
        body: dict[str, Any] = {"image": _b64(image), "text_prompts": list(text_prompts)}
        if confidence_threshold is not None:
            body["confidence_threshold"] = confidence_threshold
        return _Call("POST", "/api/v1/image/cached-features", _sam3, {"json": body})

    @staticmethod
    def vjepa2_infer(frames: Sequence[bytes | np.ndarray], width: int | None, height: int | None, fmt: str) -> _Call[ClipResult]:
        if width is None or height is None:
            f0 = frames[0]
            if isinstance(f0, np.ndarray):
                height, width = f0.shape[:2]
            else:
                from PIL import Image

                with Image.open(io.BytesIO(f0)) as im:
                    width, height = im.size
        body = {"frames": [_frame_b64(f) for f in frames], "width": int(width), "height": int(height), "format": fmt}
        return _Call("POST", "/api/v1/infer", _clip, {"json": body})

    @staticmethod
    def m2f_segment(image: ImageInput, mask: str, model: str | None) -> _Call[MaskResult]:
        data = _bytes(image)
        h = {"Content-Type": _img_type(data), "X-Mask": mask, **({"X-Model": model} if model else {})}
        return _Call("POST", "/segment", _mask_result("mask2former"), {"content": data, "headers": h})

    @staticmethod
    def m2f_segment_batch(image: ImageInput, classes: Iterable[str] | str | None, model: str | None) -> _Call[dict[str, np.ndarray]]:
        data = _bytes(image)
        h = {"Content-Type": _img_type(data), **({"X-Model": model} if model else {})}
        params = {"classes": classes if isinstance(classes, str) else ",".join(classes)} if classes else None
        return _Call("POST", "/segment-batch", _m2f_batch, {"content": data, "headers": h, "params": params})

    # SAM3 video sessions (api/routes/sam3_video.py)
    @staticmethod
    def video_start(video_path: str, session_id: str | None) -> _Call[dict[str, Any]]:
        body: dict[str, Any] = {"video_path": video_path}
        if session_id:
            body["session_id"] = session_id
        return _Call("POST", f"{VIDEO}/session/start", _json, {"json": body})

    @staticmethod
    def video_upload(path: str | Path, session_id: str | None) -> _Call[dict[str, Any]]:
        p = Path(path)
        data = {"session_id": session_id} if session_id else None
        return _Call("POST", f"{VIDEO}/session/upload", _json, {"files": {"file": (p.name, p.open("rb"), "application/octet-stream")}, "data": data})

    @staticmethod
    def video_prompt(session_id: str, frame_index: int, prompts: Sequence[str | dict[str, Any]], obj_id: int | None) -> _Call[dict[str, Any]]:
        ps = [{"type": "text", "text": p} if isinstance(p, str) else p for p in prompts]
        return _Call("POST", f"{VIDEO}/session/{session_id}/prompt", _json, {"json": {"frame_index": frame_index, "prompts": ps, "obj_id": obj_id}})

    @staticmethod
    def video_propagate(session_id: str, direction: str, start_frame_index: int | None, max_frames: int | None) -> _Call[dict[str, Any]]:
        body = {"direction": direction, "start_frame_index": start_frame_index, "max_frames": max_frames, "stream": False}
        return _Call("POST", f"{VIDEO}/session/{session_id}/propagate", _json, {"json": {k: v for k, v in body.items() if v is not None}})

    @staticmethod
    def video_session(method: str, session_id: str, tail: str = "") -> _Call[dict[str, Any]]:
        return _Call(method, f"{VIDEO}/session/{session_id}{tail}", _json)

    @staticmethod
    def get_json(url: str) -> _Call[dict[str, Any]]:
        return _Call("GET", url, _json, {"headers": {"Accept": "application/json"}})

    @staticmethod
    def metrics() -> _Call[str]:
        return _Call("GET", "/metrics", lambda r: r.text)


VIDEO = "/api/v1/video"


def _base_url(url: str | None) -> str:
    return (url or os.environ.get("TRIFECTA_URL") or "http://127.0.0.1:8080").rstrip("/")


def _key(api_key: str | None) -> str | None:
    return api_key or os.environ.get("TRIFECTA_API_KEY")


def _close_files(c: _Call[Any]) -> None:
    for f in (c.kw.get("files") or {}).values():
        f[1].close()


def _health_ok(r: httpx.Response) -> httpx.Response:
    return r if r.status_code in (200, 503) else _check(r)  # /health answers 503 with a body when Redis is down
