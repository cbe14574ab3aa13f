"""SAM3 video sessions held by a worker: decoded frames + tracking state per session, every session call (`SessionManager`), the idle reaper."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from storage import codecs
from tasks.errors import Conflict, Gone, NoWorker, Overloaded, Unprocessable, translate
from tasks.inputs import STAGED
from tasks.sam3_video import DIRECTIONS, VideoPrompt, check_frame, parse_prompts, session_key, tenant_sessions_key
from tasks.settings import Settings
from workers.runners.base import TaskContext
from workers.sam3video.propagate import PropagateJob, expected_frames
from workers.sam3video.tracker import Sam3VideoTracker
from workers.video import forget_local, local_video, open_video

log = logging.getLogger("trifecta.sam3_video")


# ---------------------------------------------------------------- sessions
@dataclass(frozen=True)
class GeoPrompt:
    frame_index: int
    obj_id: int
    prompt: VideoPrompt


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
    state: Any = None  # Sam3VideoModel's inference session, made at the first text prompt
    gstate: Any = None  # Sam3TrackerVideoModel's, made at the first box/point prompt
    pixels: dict[str, Any] = field(default_factory=dict)  # the models' input tensor of the video (shared)
    prompts: list[dict[str, Any]] = field(default_factory=list)
    geo: list[GeoPrompt] = field(default_factory=list)  # box/point inputs, replayed when an object is removed
    objects: dict[int, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def text_ids(self) -> set[int]:
        """Ids the text model holds, or will give next (its later detections count up from max_obj_id)."""
        if self.state is None:
            return set()
        return {int(i) for i in self.state.obj_ids}

    def next_id(self) -> int:
        used = [*self.objects, *(g.obj_id for g in self.geo), int(self.state.max_obj_id) if self.state is not None else -1]
        return max(used, default=-1) + 1

    def reserve(self, obj_id: int) -> None:
        """Keep the text model's new objects off box/point ids (it numbers them from max_obj_id + 1)."""
        if self.state is not None:
            self.state.max_obj_id = max(int(self.state.max_obj_id), obj_id)

    def info(self) -> dict[str, Any]:
        h, w = self.frames[0].shape[:2]
        n = len(self.frames)
        return {"total_frames": n, "fps": round(self.fps, 6), "resolution": {"width": int(w), "height": int(h)}, "duration_seconds": round(n / self.fps, 6) if self.fps else 0.0}


class SessionManager:
    def __init__(self, settings: Settings, svc: TaskContext, tracker: Sam3VideoTracker | None) -> None:
        self.settings, self.svc, self.tracker = settings, svc, tracker
        self.sessions: dict[tuple[str, str], Session] = {}  # (tenant, session id): ids are per tenant
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
            if (s.tenant, s.id) not in self.sessions:  # closed while this call waited for the lock
                raise Gone(f"session {s.id} was closed")
            s.last_used = time.time()
            out = fn(s, call.get("args") or {})
            s.last_used = time.time()
        return out

    def _get(self, call: dict[str, Any]) -> Session:
        sid = call.get("session_id", "")
        s = self.sessions.get((str(call.get("tenant")), sid))
        if s is None:
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
        tenant = call.get("tenant", "default")
        with self._lock:
            if (tenant, sid) in self.sessions:
                raise Conflict(f"session {sid} already exists")
            if self.count >= self.settings.max_sessions_per_worker:
                raise Overloaded(f"worker {self.svc.worker_id} holds {self.count} sessions (MAX_SESSIONS_PER_WORKER={self.settings.max_sessions_per_worker}); close one or retry later")
            self._starting += 1
        try:
            uri = args["uri"]
            path = local_video(uri, self.svc.store, self.settings, tenant=call["tenant"])  # the tenant's own check again (the API checked it too)
            frames: list[np.ndarray] = []
            deadline = time.monotonic() + self.settings.video_decode_timeout_s
            with open_video(path, self.settings) as v:
                fps = v.info.fps
                for _, _, _, rgb in v.frames(deadline=deadline):
                    frames.append(rgb)
            if not frames:
                from tasks.errors import UnreadableVideo

                raise UnreadableVideo("the video has no decodable frames")
            s = Session(sid, tenant, uri, frames, fps or 25.0, upload=args.get("upload"))
            with self._lock:
                self.sessions[(tenant, sid)] = s
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
            "model_state": s.state is not None or s.gstate is not None,
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
        raw = args.get("prompts")
        if raw is None:  # an API from before box/point prompts sent `texts`
            raw = [{"type": "text", "text": t} for t in args.get("texts") or []]
        prompt = parse_prompts(raw, max_prompts=self.settings.max_prompts)
        tr = self._need_tracker()
        if prompt.geometric:
            return self._prompt_geometric(s, tr, fi, prompt, args.get("obj_id"))
        texts = list(prompt.texts)
        if s.state is None:
            s.state = tr.new_state(s.frames, s.pixels)
            for g in s.geo:
                s.reserve(g.obj_id)
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

    def _prompt_geometric(self, s: Session, tr: Any, fi: int, prompt: VideoPrompt, obj_id: Any) -> dict[str, Any]:
        """A box and/or points for one object (`obj_id`, or a new one) on one frame: the tracker's mask there."""
        if obj_id is None:
            obj_id = s.next_id()
        obj_id = int(obj_id)
        if obj_id in s.text_ids() or s.objects.get(obj_id, {}).get("prompt") is not None:
            raise Conflict(f"object {obj_id} was found by a text prompt; box and point prompts add or refine objects of their own — omit obj_id for a new object")
        if s.gstate is None:
            s.gstate = tr.new_geometric_state(s.frames, s.pixels)
        res = tr.add_geometric(s.gstate, fi, obj_id, prompt)
        s.geo = [g for g in s.geo if (g.frame_index, g.obj_id) != (fi, obj_id)] + [GeoPrompt(fi, obj_id, prompt)]
        s.reserve(obj_id)
        s.prompts.append({"frame_index": fi, "obj_id": obj_id, "prompts": prompt.wire()})
        s.objects[obj_id] = {"frame_index": fi, "prompt": None, "kind": "box" if prompt.box is not None else "points", "score": res.scores[0] if res.scores else None}
        return {
            "frame_index": fi,
            "obj_id": obj_id,
            "obj_ids": res.obj_ids,
            "masks": [codecs.encode_rle(m) for m in res.masks],
            "boxes": res.boxes,
            "scores": res.scores,
            "worker": self.svc.worker_id,
        }

    def op_propagate(self, s: Session, args: dict[str, Any]) -> dict[str, Any]:
        """Track every prompted object through the video. Three ways to answer: all frames in the
        reply; each frame published on `args.stream` as it is done (the WebSocket; stops when no
        one listens any more); or, with `args.job`, each frame written to storage as a job's output."""
        t0 = time.perf_counter()
        job = PropagateJob(self.svc, str(args["job"]), s) if args.get("job") else None
        if job is not None and not job.start():
            return {"session_id": s.id, "job_id": job.id, "status": job.status, "worker": self.svc.worker_id}
        try:
            direction = args.get("direction", "forward")
            if direction not in DIRECTIONS:
                raise Unprocessable(f"direction must be one of {', '.join(DIRECTIONS)}")
            start = args.get("start_frame_index")
            start = 0 if start is None else int(start)
            check_frame(start, len(s.frames))
            mx = args.get("max_frames")
            tr = self._need_tracker()
            if not s.prompts or (s.state is None and s.gstate is None):
                raise Unprocessable("add a prompt (POST .../prompt) before propagating")
            stream = args.get("stream")  # a pub/sub channel: each frame is published there as it is done (the WebSocket)
            if job is not None:
                job.expect(expected_frames(len(s.frames), start, mx, direction, s.state is not None and bool(s.state.prompts), s.gstate is not None and s.gstate.get_obj_num() > 0))
            results: dict[str, Any] = {}
            seen: set[int] = set()
            stopped = False
            for reverse in ([False] if direction == "forward" else [True] if direction == "backward" else [False, True]):
                with closing(tr.propagate(s.state, s.gstate, start, mx, reverse)) as frames:  # closing: a break releases the model at once
                    for fr in frames:
                        if fr.frame_index in seen:  # "both": the tracker's reverse run starts again at the start frame
                            continue
                        frame = {"frame_index": fr.frame_index, "objects": fr.objects()}
                        seen.add(fr.frame_index)
                        if job is not None:
                            stopped = not job.frame(frame, s.frames[0].shape[:2])
                        elif stream:
                            stopped = self.svc.r.publish(stream, orjson.dumps({"type": "frame", **frame})) == 0  # the client left
                        else:
                            results[str(fr.frame_index)] = frame
                        if stopped:
                            break
                if stopped:
                    break
        except Exception as e:
            if job is not None:
                job.fail(translate(e))
            raise
        results = dict(sorted(results.items(), key=lambda kv: int(kv[0])))
        ms = round((time.perf_counter() - t0) * 1000, 2)
        if stopped:
            log.info("session %s: propagation stopped after %d frames (%s)", s.id, len(seen), "job cancelled" if job is not None else "stream closed")
        if job is not None:
            meta = {"session_id": s.id, "direction": direction, "start_frame_index": start, "max_frames": mx, "total_frames": len(seen), "objects": sorted(s.objects), "processing_time_ms": ms}
            job.finish(meta)
            return {"session_id": s.id, "job_id": job.id, "status": job.status, "total_frames": len(seen), "processing_time_ms": ms, "worker": self.svc.worker_id}
        if stream:
            self.svc.r.publish(stream, orjson.dumps({"type": "complete", "total_frames": len(seen), "processing_time_ms": ms}))
        return {"session_id": s.id, "results": results, "total_frames": len(seen), "processing_time_ms": ms, "worker": self.svc.worker_id}

    def op_remove_object(self, s: Session, args: dict[str, Any]) -> dict[str, Any]:
        oid = int(args["obj_id"])
        if oid not in s.objects:
            from tasks.errors import NotFound

            raise NotFound(f"session {s.id} has no object {oid}")
        if any(g.obj_id == oid for g in s.geo):
            self._drop_geometric(s, oid)
        elif s.state is not None and self.tracker is not None:
            self.tracker.remove_object(s.state, oid)
        del s.objects[oid]
        return {"session_id": s.id, "obj_id": oid, "removed": True, "objects": sorted(s.objects), "worker": self.svc.worker_id}

    def _drop_geometric(self, s: Session, oid: int) -> None:
        """transformers' tracker session cannot forget one object, so a new one is made from the
        other objects' box/point inputs (a model call per input; the next propagation re-tracks them)."""
        s.geo = [g for g in s.geo if g.obj_id != oid]
        s.prompts = [p for p in s.prompts if p.get("obj_id") != oid or "texts" in p]
        s.gstate = None
        if s.geo:
            s.gstate = self.tracker.new_geometric_state(s.frames, s.pixels)
            for g in s.geo:
                self.tracker.add_geometric(s.gstate, g.frame_index, g.obj_id, g.prompt)

    def op_reset(self, s: Session, args: dict[str, Any]) -> dict[str, Any]:
        s.state = s.gstate = None  # fresh model states at the next prompt: prompts, objects and memory all go
        s.geo.clear()
        s.prompts.clear()
        s.objects.clear()
        return {"session_id": s.id, "status": "ready", "reset": True, "worker": self.svc.worker_id}

    def op_close(self, s: Session, args: dict[str, Any]) -> dict[str, Any]:
        self._drop(s)
        return {"session_id": s.id, "closed": True, "worker": self.svc.worker_id}

    def _drop(self, s: Session) -> None:
        with self._lock:
            self.sessions.pop((s.tenant, s.id), None)
        s.state = s.gstate = None
        s.pixels.clear()
        s.frames = s.frames[:1]  # keep info() answerable for a waiter; free the rest now
        if s.upload:
            try:
                self.svc.store.delete_prefix(s.upload)
            except Exception as e:  # noqa: BLE001
                log.warning("session %s: upload %s not deleted: %s", s.id, s.upload, e)
        try:
            self.svc.r.delete(session_key(s.tenant, s.id))
            self.svc.r.srem(tenant_sessions_key(s.tenant), s.id)
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
