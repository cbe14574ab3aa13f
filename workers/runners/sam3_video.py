"""SAM3 video sessions held by a worker: decoded frames + tracking state, per session.

    sessions = register(app, svc, tracker)   # from a runner's `register_tasks(app, svc)`

Registers the `trifecta.video` Celery task (`tasks.sam3_video`) on the worker. The API
sends every call of a session to the private queue of the worker that started it, so the
session's state never leaves this process. A session is:

- the video decoded once with PyAV (`workers.video`: MAX_VIDEO_FRAMES, MAX_VIDEO_PIXELS,
  MAX_VIDEO_BYTES for a download), the RGB frames kept in memory;
- the models' inference sessions, made at the first prompt of their kind from those frames
  (resized and normalised once, shared): transformers' `Sam3VideoModel` for text prompts
  (every matching object) and `Sam3TrackerVideoModel` for box/point prompts (one object
  each); a propagation runs both and merges their objects frame by frame.

A propagation answers all frames at once, streams them on a pub/sub channel (the
WebSocket; it stops when no one listens any more), or runs as a job (`"async": true`):
each frame's objects written to `<tenant>/jobs/<id>/frames/<index>.json`, the record's
`progress` kept current, a cancel noticed within a quarter of a second.

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
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from storage import codecs
from tasks import jobstore, keys
from tasks.errors import Conflict, Gone, NoWorker, Overloaded, TrifectaError, Unprocessable, translate
from tasks.inputs import STAGED
from tasks.sam3_video import DIRECTIONS, FRAME_OUTPUT, JOB_KIND, TASK_VIDEO, VideoPrompt, check_frame, parse_prompts, session_key, tenant_sessions_key
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

    def objects(self) -> list[dict[str, Any]]:
        """The source service's per-frame objects: `{"id", "mask" (COCO RLE), "box", "score"}`."""
        return [{"id": i, "mask": codecs.encode_rle(m), "box": b, "score": sc} for i, m, b, sc in zip(self.obj_ids, self.masks, self.boxes, self.scores, strict=True)]


class Sam3VideoTracker:
    """transformers' SAM3 video models, each loaded from SAM3_CHECKPOINT at its first use:

    - text prompts: `Sam3VideoModel` / `Sam3VideoProcessor` (the detector finds every object
      matching the text on each frame, the tracker follows them);
    - box and point prompts: `Sam3TrackerVideoModel` / `Sam3TrackerVideoProcessor`, the same
      checkpoint's tracker (transformers maps a sam3_video checkpoint onto it: the detector's
      ViT, `tracker_neck`, `tracker_model.*`), one object per prompt.

    With both loaded, the tracker uses the video model's ViT (the same weights, by that
    mapping) instead of a second copy. The model runs one call at a time (`lock`)."""

    def __init__(self, settings: Settings, device: Any, dtype: Any = None) -> None:
        self.settings, self.device, self._dtype = settings, device, dtype
        self.net: Any = None
        self.processor: Any = None
        self.tnet: Any = None
        self.tprocessor: Any = None
        self.lock = threading.Lock()
        self._load_lock = threading.Lock()

    def _kw(self) -> dict[str, Any]:
        src = self.settings.sam3_checkpoint
        return {} if Path(src).is_dir() else {"token": self.settings.hf_token, "local_files_only": self.settings.hf_local_files_only}

    def _setup(self) -> None:
        import torch

        self.dtype = self._dtype or torch.float32
        self.torch_device = torch.device(self.device.local)

    def load_text(self) -> None:
        """At the first text prompt: an image-only deployment never pays for the video model's memory."""
        with self._load_lock:
            if self.net is not None:
                return
            from transformers import Sam3VideoModel, Sam3VideoProcessor

            self._setup()
            src, t0 = self.settings.sam3_checkpoint, time.time()
            self.processor = Sam3VideoProcessor.from_pretrained(src, **self._kw())
            self.net = Sam3VideoModel.from_pretrained(src, dtype=self.dtype, **self._kw()).to(self.torch_device).eval()
            self._share_backbone()
            log.info("loaded Sam3VideoModel from %s on %s in %.1fs", src, self.device, time.time() - t0)

    def load_geometric(self) -> None:
        """At the first box or point prompt."""
        with self._load_lock:
            if self.tnet is not None:
                return
            from transformers import Sam3TrackerVideoModel, Sam3TrackerVideoProcessor

            self._setup()
            src, t0 = self.settings.sam3_checkpoint, time.time()
            self.tprocessor = Sam3TrackerVideoProcessor.from_pretrained(src, **self._kw())
            self.tnet = Sam3TrackerVideoModel.from_pretrained(src, dtype=self.dtype, **self._kw()).to(self.torch_device).eval()
            self._share_backbone()
            log.info("loaded Sam3TrackerVideoModel from %s on %s in %.1fs", src, self.device, time.time() - t0)

    def _share_backbone(self) -> None:
        if self.net is None or self.tnet is None:
            return
        ours, theirs = self.tnet.vision_encoder.backbone, self.net.detector_model.vision_encoder.backbone
        if ours is not theirs and _same_module(ours, theirs):
            self.tnet.vision_encoder.backbone = theirs  # the ViT is most of SAM3: hold it once

    # -- sessions of the models ----------------------------------------------------------
    def pixels(self, frames: list[np.ndarray], cache: dict[str, Any], text: bool) -> Any:
        """The video resized and normalised for a model, once per session: both models read the
        checkpoint's one video processor config, so their sessions share the same tensor."""
        vp = (self.processor if text else self.tprocessor).video_processor
        key = vp.to_json_string()
        if key not in cache:
            cache[key] = vp(videos=frames, device="cpu", return_tensors="pt").pixel_values_videos[0].to(self.dtype)
        return cache[key]

    def new_state(self, frames: list[np.ndarray], cache: dict[str, Any]) -> Any:
        """A text-prompt session (Sam3VideoModel)."""
        from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession

        self.load_text()
        return self._session(Sam3VideoInferenceSession, self.pixels(frames, cache, True), frames)

    def new_geometric_state(self, frames: list[np.ndarray], cache: dict[str, Any]) -> Any:
        """A box/point session (Sam3TrackerVideoModel)."""
        from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoInferenceSession

        self.load_geometric()
        return self._session(Sam3TrackerVideoInferenceSession, self.pixels(frames, cache, False), frames)

    def _session(self, cls: Any, pixels: Any, frames: list[np.ndarray]) -> Any:
        # what the processors' init_video_session builds, from pixels already made (no second copy)
        h, w = frames[0].shape[:2]
        dev = self.torch_device
        return cls(video=pixels, video_height=h, video_width=w, inference_device=dev, inference_state_device=dev, video_storage_device="cpu", dtype=self.dtype)

    # -- prompts ---------------------------------------------------------------------------
    def add_text(self, state: Any, frame_index: int, texts: list[str]) -> FrameResult:
        import torch

        with self.lock, torch.inference_mode():
            state = self.processor.add_text_prompt(inference_session=state, text=texts)
            out = self.net(inference_session=state, frame_idx=frame_index)
            return self._result(state, out, frame_index)

    def add_geometric(self, gstate: Any, frame_index: int, obj_id: int, prompt: VideoPrompt) -> FrameResult:
        """One object's box and/or points on a frame (they replace its inputs there); its mask on that frame."""
        import torch

        h, w = int(gstate.video_height), int(gstate.video_width)
        kw: dict[str, Any] = {}
        if prompt.box is not None:
            cx, cy, bw, bh = prompt.box
            kw["input_boxes"] = [[[(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]]]
        if prompt.points:
            kw["input_points"] = [[[[x * w, y * h] for x, y in prompt.points]]]
            kw["input_labels"] = [[list(prompt.labels)]]
        with self.lock, torch.inference_mode():
            self.tprocessor.add_inputs_to_inference_session(inference_session=gstate, frame_idx=frame_index, obj_ids=[obj_id], **kw)
            out = self.tnet(inference_session=gstate, frame_idx=frame_index)
            return self._geometric_result(out, h, w, only=obj_id)

    # -- propagation -----------------------------------------------------------------------
    def propagate(self, state: Any, gstate: Any, start: int, max_frames: int | None, reverse: bool) -> Iterator[FrameResult]:
        """Frames in processing order, each with the objects of both models (text, then box/point)."""
        import torch

        with self.lock, torch.inference_mode():
            runs = []
            if state is not None and state.prompts:
                runs.append(self._text_frames(state, start, max_frames, reverse))
            if gstate is not None and gstate.get_obj_num() > 0:
                runs.append(self._geometric_frames(gstate, start, max_frames, reverse))
            yield from merge_frames(runs, reverse)

    def _text_frames(self, state: Any, start: int, max_frames: int | None, reverse: bool) -> Iterator[FrameResult]:
        for out in self.net.propagate_in_video_iterator(inference_session=state, start_frame_idx=start, max_frame_num_to_track=max_frames, reverse=reverse):
            yield self._result(state, out, int(out.frame_idx))

    def _geometric_frames(self, gstate: Any, start: int, max_frames: int | None, reverse: bool) -> Iterator[FrameResult]:
        h, w = int(gstate.video_height), int(gstate.video_width)
        for out in self.tnet.propagate_in_video_iterator(inference_session=gstate, start_frame_idx=start, max_frame_num_to_track=max_frames, reverse=reverse):
            yield self._geometric_result(out, h, w)

    # -- objects -------------------------------------------------------------------------------
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

    def _geometric_result(self, out: Any, h: int, w: int, only: int | None = None) -> FrameResult:
        """The tracker's objects on a frame at the video's size. While propagating, an object whose
        mask is empty there (gone, hidden) is left out, as the text model does; the answer to
        a prompt always has its object."""
        masks = self.tprocessor.post_process_masks([out.pred_masks.float()], original_sizes=[[h, w]], binarize=True)[0][:, 0].cpu().numpy()
        scores = out.object_score_logits.float().sigmoid().flatten().tolist()
        fr = FrameResult(int(out.frame_idx), [], [], [], [])
        for oid, m, sc in zip(out.object_ids, masks, scores, strict=True):
            if (only is not None and oid != only) or (only is None and not m.any()):
                continue
            fr.obj_ids.append(int(oid))
            fr.masks.append(m)
            fr.boxes.append(_mask_box(m))
            fr.scores.append(round(float(sc), 6))
        return fr


def merge_frames(runs: list[Iterator[FrameResult]], reverse: bool) -> Iterator[FrameResult]:
    """Frames from several models' propagations, merged by frame index in processing order.

    Each run yields its frames in that order (ascending, or descending in reverse) but not
    always the same set (transformers' text model starts a reverse run one frame before the
    start, the tracker at it), so a frame is complete once no run can still yield it."""
    order = (lambda f: -f) if reverse else (lambda f: f)
    heads: list[FrameResult | None] = [next(r, None) for r in runs]
    while any(h is not None for h in heads):
        k = min(order(h.frame_index) for h in heads if h is not None)
        merged: FrameResult | None = None
        for i, h in enumerate(heads):
            if h is None or order(h.frame_index) != k:
                continue
            if merged is None:
                merged = h
            else:
                merged.obj_ids += h.obj_ids
                merged.masks += h.masks
                merged.boxes += h.boxes
                merged.scores += h.scores
            heads[i] = next(runs[i], None)
        assert merged is not None
        yield merged


def _same_module(a: Any, b: Any) -> bool:
    """Same class, same config (dtype aside) and same tensors: safe to use one for the other."""
    import torch

    ca, cb = ({k: v for k, v in m.config.to_dict().items() if k != "dtype"} for m in (a, b))
    if type(a) is not type(b) or ca != cb:
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def _list(v: Any) -> list[Any]:
    if v is None:
        return []
    return list(v)


def _cxcywh_abs(b: list[float], w: int, h: int) -> list[float]:
    x0, y0, x1, y1 = b
    return [round((x0 + x1) / 2 / w, 6), round((y0 + y1) / 2 / h, 6), round((x1 - x0) / w, 6), round((y1 - y0) / h, 6)]


def _mask_box(m: np.ndarray) -> list[float]:
    """A mask's bounding box as the text path gives it (torchvision's masks_to_boxes, then [cx, cy, w, h] normalised)."""
    h, w = m.shape
    ys, xs = np.nonzero(m)
    if not len(xs):
        return [0.0, 0.0, 0.0, 0.0]
    return _cxcywh_abs([float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())], w, h)


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
    def __init__(self, settings: Settings, svc: Any, tracker: Any | None) -> None:
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


# ---------------------------------------------------------------- propagate jobs
def expected_frames(n: int, start: int, max_frames: int | None, direction: str, text: bool, geometric: bool) -> int:
    """How many frames a propagation visits, as transformers orders them: forward runs
    start..start+max_frames; in reverse the text model starts at start-1, the tracker at start."""
    mx = n if max_frames is None else max_frames
    fwd = set(range(start, min(start + mx, n - 1) + 1))
    lo = max(start - mx, 0)
    back: set[int] = set(range(lo, start)) if text else set()
    if geometric and start > 0:
        back |= set(range(lo, start + 1))
    return len(fwd if direction == "forward" else back if direction == "backward" else fwd | back)


class PropagateJob:
    """A propagate call submitted as a job (`"async": true`): its record's transitions (the
    jobstore's Lua, as every job), one JSON output per frame under `<tenant>/jobs/<id>/`,
    `progress` about four times a second (which also notices a cancel), and the finish."""

    PROGRESS_EVERY_S = 0.25

    def __init__(self, svc: Any, job_id: str, s: Session) -> None:
        self.svc, self.id, self.session = svc, job_id, s
        self.key = keys.job(job_id)
        self.prefix = f"{s.tenant}/jobs/{job_id}"
        self.outputs: list[dict[str, Any]] = []
        self.total = 0
        self.status = "queued"
        self.started = time.time()
        self._last = 0.0

    def start(self) -> bool:
        self.status, _ = jobstore.Jobs(self.svc.r).start(self.id, self.svc.settings.max_deliveries, self.svc.worker_id)
        if self.status != "running":
            log.info("job=%s (propagate, session %s) not run: %s", self.id, self.session.id, self.status)
        return self.status == "running"

    def expect(self, total: int) -> None:
        self.total = total
        self._progress(force=True)

    def frame(self, frame: dict[str, Any], shape: tuple[int, ...]) -> bool:
        """Store one frame's objects; False once the job was cancelled (stop propagating)."""
        fi = int(frame["frame_index"])
        data = orjson.dumps(frame)
        path = f"{self.prefix}/{FRAME_OUTPUT.format(fi)}"
        self.svc.store.put(path, data, "application/json")
        self.outputs.append({"key": f"frame_{fi:06d}", "frame_index": fi, "format": "rle", "shape": [int(x) for x in shape], "path": path, "bytes": len(data), "content_type": "application/json"})
        return self._progress(force=len(self.outputs) >= self.total)

    def _progress(self, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now - self._last < self.PROGRESS_EVERY_S:
            return True
        self._last = now
        done = len(self.outputs)
        prog = {"done": done, "total": max(self.total, done), "frames_done": done, "frames_total": max(self.total, done), "last_frame_index": self.outputs[-1]["frame_index"] if self.outputs else None}
        pipe = self.svc.r.pipeline(transaction=False)
        jobstore.queue(pipe, jobstore.progress_call(self.id, prog))  # → the job's status
        pipe.expire(session_key(self.session.tenant, self.session.id), int(self.svc.settings.session_ttl_seconds) + 5)  # a long job keeps its session alive
        st, _ = pipe.execute()
        if st in (b"cancelled", "cancelled"):
            self.status = "cancelled"
            return False
        return True

    def finish(self, meta: dict[str, Any]) -> None:
        if self.status == "cancelled":
            return
        self._progress(force=True)
        if self.status == "cancelled":
            return
        outputs = sorted(self.outputs, key=lambda o: o["frame_index"])
        result = {
            "outputs": outputs,
            "meta": meta,
            "timing": {"model_ms": meta.get("processing_time_ms")},
            "worker": self.svc.worker_id,
            "device": str(self.svc.device),
            "trained": self.svc.runner.trained,
        }
        self._end("succeeded", "result", result)

    def fail(self, err: TrifectaError) -> None:
        self._end("failed", "error", jobstore.error(err))

    def _end(self, status: str, field_name: str, body: dict[str, Any]) -> None:
        done = jobstore.Jobs(self.svc.r).finish(self.id, status, field_name, body)
        if done:
            self.status = status
        log.info("job=%s model=%s device=%s status=%s kind=%s session=%s frames=%d", self.id, self.svc.model, self.svc.device, status if done else "not-recorded", JOB_KIND, self.session.id, len(self.outputs))


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
            body = {"id": cid, "status": "failed", "error": jobstore.error(err)}
            job = (call.get("args") or {}).get("job")
            if job:  # a job whose call failed before it ran (session closed, 410): its record says why; no one waits on a reply
                jobstore.Jobs(svc.r).fail(str(job), body["error"])
        if call.get("reply"):
            svc.r.publish(call["reply"], orjson.dumps(body))

    return [TASK_VIDEO]
