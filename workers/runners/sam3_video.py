"""SAM3 video sessions held by a worker: decoded frames + tracking state, per session.

    sessions = register(app, svc, tracker)   # from a runner's `register_tasks(app, svc)`

Registers the `trifecta.video` Celery task (`tasks.sam3_video`) on the worker. The API
sends every call of a session to the private queue of the worker that started it, so the
session's state never leaves this process. A session is:

- the video decoded once with PyAV (`workers.video`: MAX_VIDEO_FRAMES, MAX_VIDEO_PIXELS,
  MAX_VIDEO_BYTES for a download), the RGB frames kept in memory;
- the model's inference session (transformers' `Sam3VideoModel` / `Sam3VideoProcessor`,
  text prompts), created at the first prompt from those frames.

At most MAX_SESSIONS_PER_WORKER sessions (503 beyond); a session unused for
SESSION_TTL_SECONDS is closed by a reaper thread, which also deletes its upload and its
Redis record. Calls on one session run one at a time (a lock per session); the model runs
one call at a time per worker. The worker's open-session count is published in its
registration hash (`sessions`), which the API reads to place new sessions on the least
loaded worker.

`tracker=None` (VIDEO_SESSION_MODEL=echo) gives decode-only sessions: start, status,
reset, close work; prompt and propagate answer 503.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from storage import codecs
from tasks.errors import Conflict, Gone, NoWorker, Overloaded, TrifectaError, Unprocessable, translate
from tasks.inputs import STAGED
from tasks.sam3_video import DIRECTIONS, TASK_VIDEO, check_frame, session_key
from tasks.settings import Settings
from workers.video import forget_local, local_video, open_video

log = logging.getLogger("trifecta.sam3_video")


# ---------------------------------------------------------------- the model
@dataclass
class FrameResult:
    frame_index: int
    obj_ids: list[int]
    masks: list[np.ndarray]  # H x W bool each, at the video's size
    boxes: list[list[float]]  # [cx, cy, w, h] normalised
    scores: list[float]


class Sam3VideoTracker:
    """transformers' Sam3VideoModel with text prompts (detector + tracker), loaded from SAM3_CHECKPOINT."""

    def __init__(self, settings: Settings, device: Any, dtype: Any = None) -> None:
        self.settings, self.device, self._dtype = settings, device, dtype
        self.net: Any = None
        self.processor: Any = None
        self.lock = threading.Lock()

    def _load(self) -> None:
        """At the first video prompt: an image-only deployment never pays for the tracker's memory."""
        with self.lock:
            if self.net is not None:
                return
            import torch
            from transformers import Sam3VideoModel, Sam3VideoProcessor

            src = self.settings.sam3_checkpoint
            kw: dict[str, Any] = {}
            if not Path(src).is_dir():
                kw = {"token": self.settings.hf_token, "local_files_only": self.settings.hf_local_files_only}
            self.dtype = self._dtype or torch.float32
            self.torch_device = torch.device(self.device.local)
            t0 = time.time()
            self.processor = Sam3VideoProcessor.from_pretrained(src, **kw)
            self.net = Sam3VideoModel.from_pretrained(src, dtype=self.dtype, **kw).to(self.torch_device).eval()
            log.info("loaded Sam3VideoModel from %s on %s in %.1fs", src, self.device, time.time() - t0)

    def new_state(self, frames: list[np.ndarray]) -> Any:
        self._load()
        return self.processor.init_video_session(video=frames, inference_device=self.torch_device, processing_device="cpu", video_storage_device="cpu", dtype=self.dtype)

    def add_text(self, state: Any, frame_index: int, texts: list[str]) -> FrameResult:
        import torch

        with self.lock, torch.inference_mode():
            state = self.processor.add_text_prompt(inference_session=state, text=texts)
            out = self.net(inference_session=state, frame_idx=frame_index)
            return self._result(state, out, frame_index)

    def propagate(self, state: Any, start: int, max_frames: int | None, reverse: bool) -> Iterator[FrameResult]:
        import torch

        with self.lock, torch.inference_mode():
            for out in self.net.propagate_in_video_iterator(inference_session=state, start_frame_idx=start, max_frame_num_to_track=max_frames, reverse=reverse):
                yield self._result(state, out, int(out.frame_idx))

    def remove_object(self, state: Any, obj_id: int) -> None:
        with self.lock:
            state.remove_object(obj_id)

    def _result(self, state: Any, out: Any, frame_index: int) -> FrameResult:
        p = self.processor.postprocess_outputs(state, out)
        ids = [int(i) for i in _list(p.get("object_ids"))]
        masks = [np.asarray(m.cpu() if hasattr(m, "cpu") else m).astype(bool) for m in _list(p.get("masks"))]
        scores = [round(float(s), 6) for s in _list(p.get("scores"))]
        h, w = (masks[0].shape if masks else (1, 1))
        boxes = [_cxcywh_abs([float(v) for v in b], w, h) for b in _list(p.get("boxes"))]
        return FrameResult(frame_index, ids, masks, boxes, scores)


def _list(v: Any) -> list[Any]:
    if v is None:
        return []
    return list(v)


def _cxcywh_abs(b: list[float], w: int, h: int) -> list[float]:
    x0, y0, x1, y1 = b
    return [round((x0 + x1) / 2 / w, 6), round((y0 + y1) / 2 / h, 6), round((x1 - x0) / w, 6), round((y1 - y0) / h, 6)]


# ---------------------------------------------------------------- sessions
@dataclass
class Session:
    id: str
    tenant: str
    source: str
    frames: list[np.ndarray]
    fps: float
    upload: str | None = None  # our storage prefix holding an uploaded video, deleted on close
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    state: Any = None  # the model's inference session, made at the first prompt
    prompts: list[dict[str, Any]] = field(default_factory=list)
    objects: dict[int, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def info(self) -> dict[str, Any]:
        h, w = self.frames[0].shape[:2]
        n = len(self.frames)
        return {"total_frames": n, "fps": round(self.fps, 6), "resolution": {"width": int(w), "height": int(h)}, "duration_seconds": round(n / self.fps, 6) if self.fps else 0.0}


class SessionManager:
    def __init__(self, settings: Settings, svc: Any, tracker: Any | None) -> None:
        self.settings, self.svc, self.tracker = settings, svc, tracker
        self.sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._starting = 0
        self.closed_idle = 0

    @property
    def count(self) -> int:
        return len(self.sessions) + self._starting

    # -- the task ----------------------------------------------------------------
    def handle(self, call: dict[str, Any]) -> dict[str, Any]:
        op = call.get("op")
        fn = getattr(self, f"op_{op}", None)
        if fn is None:
            raise Unprocessable(f"unknown session op {op!r}")
        if op == "start":
            return fn(call)
        s = self._get(call)
        with s.lock:
            if s.id not in self.sessions:  # closed while this call waited for the lock
                raise Gone(f"session {s.id} was closed")
            s.last_used = time.time()
            out = fn(s, call.get("args") or {})
            s.last_used = time.time()
        return out

    def _get(self, call: dict[str, Any]) -> Session:
        sid = call.get("session_id", "")
        s = self.sessions.get(sid)
        if s is None or s.tenant != call.get("tenant"):
            raise Gone(f"session {sid} is not open on worker {self.svc.worker_id} (closed after SESSION_TTL_SECONDS idle, or the worker restarted); start a new session")
        return s

    def _publish_count(self) -> None:
        try:
            self.svc.beat()  # the API sees the new session count at its next poll, not the next heartbeat
        except Exception as e:  # noqa: BLE001 - the heartbeat thread publishes it anyway
            log.warning("could not publish the session count: %s", e)

    # -- ops -----------------------------------------------------------------------
    def op_start(self, call: dict[str, Any]) -> dict[str, Any]:
        sid, args = call["session_id"], call.get("args") or {}
        with self._lock:
            if sid in self.sessions:
                raise Conflict(f"session {sid} already exists")
            if self.count >= self.settings.max_sessions_per_worker:
                raise Overloaded(f"worker {self.svc.worker_id} holds {self.count} sessions (MAX_SESSIONS_PER_WORKER={self.settings.max_sessions_per_worker}); close one or retry later")
            self._starting += 1
        try:
            uri = args["uri"]
            path = local_video(uri, self.svc.store, self.settings)
            frames: list[np.ndarray] = []
            deadline = time.monotonic() + self.settings.video_decode_timeout_s
            with open_video(path, self.settings) as v:
                fps = v.info.fps
                for _, _, _, rgb in v.frames(deadline=deadline):
                    frames.append(rgb)
            if not frames:
                from tasks.errors import UnreadableVideo

                raise UnreadableVideo("the video has no decodable frames")
            s = Session(sid, call.get("tenant", "default"), uri, frames, fps or 25.0, upload=args.get("upload"))
            with self._lock:
                self.sessions[sid] = s
        finally:
            with self._lock:
                self._starting -= 1
            if not args.get("upload") and "uri" in args and not str(args["uri"]).startswith(("/", "file://", STAGED)):
                forget_local(args["uri"], self.svc.store)
        self._publish_count()
        log.info("session %s started on %s: %d frames %s", sid, self.svc.worker_id, len(frames), s.info()["resolution"])
        return {"session_id": sid, "video_info": s.info(), "status": "ready", "worker": self.svc.worker_id}

    def op_status(self, s: Session, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "session_id": s.id,
            "status": "ready",
            "video_info": s.info(),
            "prompts": s.prompts,
            "objects": sorted(s.objects),
            "num_objects": len(s.objects),
            "model_state": s.state is not None,
            "created_at": s.created,
            "last_used_at": s.last_used,
            "idle_seconds": round(time.time() - s.last_used, 3),
            "worker": self.svc.worker_id,
            "uploaded": s.upload is not None,
        }

    def _need_tracker(self) -> Any:
        if self.tracker is None:
            raise NoWorker(f"worker {self.svc.worker_id} holds decode-only sessions (no SAM3 video model, VIDEO_SESSION_MODEL={self.settings.video_session_model})")
        return self.tracker

    def op_prompt(self, s: Session, args: dict[str, Any]) -> dict[str, Any]:
        fi = int(args["frame_index"])
        check_frame(fi, len(s.frames))
        texts = [str(t) for t in args.get("texts") or []]
        if not texts:
            raise Unprocessable("give at least one text prompt")
        tr = self._need_tracker()
        if s.state is None:
            s.state = tr.new_state(s.frames)
        res = tr.add_text(s.state, fi, texts)
        s.prompts.append({"frame_index": fi, "texts": texts})
        for oid, sc in zip(res.obj_ids, res.scores, strict=False):
            s.objects[oid] = {"frame_index": fi, "prompt": texts[0], "score": sc}
        obj_id = args.get("obj_id")
        return {
            "frame_index": fi,
            "obj_id": obj_id if obj_id is not None else (res.obj_ids[0] if res.obj_ids else None),
            "obj_ids": res.obj_ids,
            "masks": [codecs.encode_rle(m) for m in res.masks],
            "boxes": res.boxes,
            "scores": res.scores,
            "worker": self.svc.worker_id,
        }

    def op_propagate(self, s: Session, args: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        direction = args.get("direction", "forward")
        if direction not in DIRECTIONS:
            raise Unprocessable(f"direction must be one of {', '.join(DIRECTIONS)}")
        start = args.get("start_frame_index")
        start = 0 if start is None else int(start)
        check_frame(start, len(s.frames))
        mx = args.get("max_frames")
        tr = self._need_tracker()
        if s.state is None or not s.prompts:
            raise Unprocessable("add a prompt (POST .../prompt) before propagating")
        stream = args.get("stream")  # a pub/sub channel: each frame is published there as it is done (the WebSocket)
        results: dict[str, Any] = {}
        seen: set[int] = set()
        for reverse in ([False] if direction == "forward" else [True] if direction == "backward" else [False, True]):
            for fr in tr.propagate(s.state, start, mx, reverse):
                frame = {
                    "frame_index": fr.frame_index,
                    "objects": [
                        {"id": oid, "mask": codecs.encode_rle(m), "box": b, "score": sc}
                        for oid, m, b, sc in zip(fr.obj_ids, fr.masks, fr.boxes, fr.scores, strict=False)
                    ],
                }
                seen.add(fr.frame_index)
                if stream:
                    self.svc.r.publish(stream, orjson.dumps({"type": "frame", **frame}))
                else:
                    results[str(fr.frame_index)] = frame
        results = dict(sorted(results.items(), key=lambda kv: int(kv[0])))
        ms = round((time.perf_counter() - t0) * 1000, 2)
        if stream:
            self.svc.r.publish(stream, orjson.dumps({"type": "complete", "total_frames": len(seen), "processing_time_ms": ms}))
        return {"session_id": s.id, "results": results, "total_frames": len(seen), "processing_time_ms": ms, "worker": self.svc.worker_id}

    def op_remove_object(self, s: Session, args: dict[str, Any]) -> dict[str, Any]:
        oid = int(args["obj_id"])
        if oid not in s.objects:
            from tasks.errors import NotFound

            raise NotFound(f"session {s.id} has no object {oid}")
        if s.state is not None and self.tracker is not None:
            self.tracker.remove_object(s.state, oid)
        del s.objects[oid]
        return {"session_id": s.id, "obj_id": oid, "removed": True, "objects": sorted(s.objects), "worker": self.svc.worker_id}

    def op_reset(self, s: Session, args: dict[str, Any]) -> dict[str, Any]:
        s.state = None  # a fresh model state at the next prompt: prompts, objects and memory all go
        s.prompts.clear()
        s.objects.clear()
        return {"session_id": s.id, "status": "ready", "reset": True, "worker": self.svc.worker_id}

    def op_close(self, s: Session, args: dict[str, Any]) -> dict[str, Any]:
        self._drop(s)
        return {"session_id": s.id, "closed": True, "worker": self.svc.worker_id}

    def _drop(self, s: Session) -> None:
        with self._lock:
            self.sessions.pop(s.id, None)
        s.state = None
        s.frames = s.frames[:1]  # keep info() answerable for a waiter; free the rest now
        if s.upload:
            try:
                self.svc.store.delete_prefix(s.upload)
            except Exception as e:  # noqa: BLE001
                log.warning("session %s: upload %s not deleted: %s", s.id, s.upload, e)
        try:
            self.svc.r.delete(session_key(s.id))
        except Exception:  # noqa: BLE001
            pass
        self._publish_count()

    # -- idle sessions -------------------------------------------------------------------
    def reap(self, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        ttl = self.settings.session_ttl_seconds
        gone = []
        for s in list(self.sessions.values()):
            if now - s.last_used > ttl and s.lock.acquire(blocking=False):
                try:
                    if now - s.last_used > ttl:
                        self._drop(s)
                        self.closed_idle += 1
                        gone.append(s.id)
                finally:
                    s.lock.release()
        for sid in gone:
            log.info("session %s closed after %.0f s idle (SESSION_TTL_SECONDS)", sid, ttl)
        return gone

    def reap_forever(self, stop: threading.Event) -> None:
        every = max(0.5, min(30.0, self.settings.session_ttl_seconds / 4))
        while not stop.wait(every):
            try:
                self.reap()
            except Exception as e:  # noqa: BLE001
                log.warning("session reaper: %s", e)


def register(app: Any, svc: Any, tracker: Any | None) -> list[str]:
    """Add the `trifecta.video` task and the session count to a worker; returns the task names."""
    mgr = SessionManager(svc.settings, svc, tracker)
    svc.video_sessions = mgr
    svc.reg_fields["sessions"] = lambda: str(mgr.count)
    svc.reg_fields["max_sessions"] = lambda: str(svc.settings.max_sessions_per_worker)
    threading.Thread(target=mgr.reap_forever, args=(threading.Event(),), daemon=True, name="session-reaper").start()

    @app.task(name=TASK_VIDEO, ignore_result=True, acks_late=False)
    def video(call: dict[str, Any]) -> None:
        cid = call.get("id", "")
        try:
            body: dict[str, Any] = {"id": cid, "status": "succeeded", "result": mgr.handle(call)}
        except Exception as e:  # noqa: BLE001 - every failure reaches the caller as its HTTP error
            err: TrifectaError = translate(e)
            if err.status >= 500 and err.code == "internal":
                log.exception("session call %s failed", call.get("op"))
            body = {"id": cid, "status": "failed", "error": {"code": err.code, "message": err.message, "status": err.status}}
        if call.get("reply"):
            svc.r.publish(call["reply"], orjson.dumps(body))

    return [TASK_VIDEO]
