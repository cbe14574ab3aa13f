"""`vjepa2`: V-JEPA 2 video classification of 16-frame clips (`VJEPA2ForVideoClassification`).

Every clip reaches the model through the batched `trifecta.infer` path, whoever sent it:
`/api/v1/infer` (one clip, waited for), a `frames` job (clips sent by a streaming
consumer, answered by polling or a callback) or a `video` job (a whole video, decoded here).
So clips from many jobs and clients share one model call.

A video job is decoded in bounded pieces: the task `trifecta.vjepa2.video` decodes one
chunk (VIDEO_CHUNK_CLIPS clips), queues those clips as `trifecta.infer` messages and then
queues the next chunk *behind* them — the queue's own order is the backpressure, no task
ever waits for another (a waiting task would hold a pool thread the batches need). Each
finished clip is recorded beside the job (`tasks.clips`); whoever records the last one
writes the timeline JSON to storage and finishes the job (which queues its webhook, if any).

Preprocessing is the checkpoint's own `VJEPA2VideoProcessor` (shortest-edge resize, centre
crop, rescale, ImageNet normalisation). A video job runs its resize and crop on the decoding
worker and ships the cropped frames (JPEG, small enough to ride inside the queue message);
the classifying worker then applies only the rescale and normalisation.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from storage.blob import BlobStore
from tasks import clips as clipc
from tasks import jobstore, keys, queuekeys
from tasks.errors import Conflict, DeadLettered, TrifectaError, Unprocessable, UnreadableVideo, translate
from tasks.images import decode_rgb
from tasks.schemas import InferRequest, Output
from tasks.settings import Settings
from tasks.wire import build_message
from workers.modelfiles import is_trained
from workers.runners.base import BatchStats, ExtraTask, Item, Produced, Runner, TaskContext
from workers.torchopt import maybe_compile, torch_dtype

log = logging.getLogger("trifecta.vjepa2")
# OpenMP threads that spin while they wait take the cores this worker's other threads (decode,
# encode, heartbeat) and other processes need: V-JEPA 2 ran 2x slower with spinning on a loaded
# 2-core machine. It must be set before torch is imported, which happens in load().
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
MODEL = "vjepa2"
JPEG_QUALITY = 95  # prepared clip frames (already at the model's input size) travel as JPEG


# ---------------------------------------------------------------- checkpoint sources
def _hf_kwargs(settings: Settings) -> dict[str, Any]:
    return {"token": settings.hf_token, "local_files_only": settings.hf_local_files_only}


def source_of(src: str) -> tuple[str, str | None]:
    """(source, revision) for /models/info; a tiny or random-init dir says so from its SOURCE.json."""
    meta = Path(src) / "SOURCE.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        return m.get("source", src), m.get("revision")
    return (src if Path(src).is_dir() else f"hf://{src}"), (None if Path(src).is_dir() else "main")


# ---------------------------------------------------------------- the runner
@dataclass
class PreparedClip:
    x: Any  # T x 3 x S x S float tensor
    top_k: int


class VJEPA2Runner(Runner):
    family = "vjepa2"

    def __init__(self, model: str, settings: Settings, device: Any) -> None:
        super().__init__(model, settings, device)
        self.jobs: ClipJobs | None = None
        self.clips_classified = 0

    def load(self) -> None:
        import torch
        from transformers import VJEPA2ForVideoClassification, VJEPA2VideoProcessor

        torch.set_num_threads(max(1, self.device.threads))
        src = self.settings.vjepa2_checkpoint
        self.source, self.revision = source_of(src)
        self.trained = is_trained(src)
        dtype = torch_dtype(self.device, self.settings)  # TORCH_DTYPE; auto: fp16 on a GPU, fp32 on a CPU
        self.net = VJEPA2ForVideoClassification.from_pretrained(src, dtype=dtype, **_hf_kwargs(self.settings)).eval().to(self.device.local)
        maybe_compile(self.net, self.settings, "V-JEPA 2")
        self.processor = VJEPA2VideoProcessor.from_pretrained(src, **_hf_kwargs(self.settings))
        cfg = self.net.config
        self.labels = [str(cfg.id2label.get(i, cfg.id2label.get(str(i), f"LABEL_{i}"))) for i in range(cfg.num_labels)]  # type: ignore[union-attr]
        crop = self.processor.crop_size
        self.crop = int(crop["height"] if isinstance(crop, dict) else getattr(crop, "height", crop))
        self.frames_per_clip = self.settings.vjepa2_frames_per_clip
        self.input_size = self.crop
        self.dtype = dtype
        log.info("loaded V-JEPA 2 from %s on %s: %d labels, crop %d, %d frames per clip", self.source, self.device, len(self.labels), self.crop, self.frames_per_clip)

    # -- the checkpoint's video processor, in two steps so video jobs can ship prepared frames --
    def resize_crop(self, frames: np.ndarray) -> np.ndarray:
        """T x H x W x 3 uint8 RGB → T x crop x crop x 3 uint8: the processor's resize and centre crop."""
        x = self.processor(videos=frames, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values_videos"][0]
        return x.permute(0, 2, 3, 1).contiguous().numpy()

    def to_tensor(self, frames: np.ndarray, prepared: bool) -> Any:
        """T x h x w x 3 uint8 RGB → T x 3 x crop x crop float: the processor's whole transform
        (only its rescale and normalisation for frames `resize_crop` already prepared)."""
        kw = {"do_resize": False, "do_center_crop": False} if prepared else {}
        return self.processor(videos=frames, return_tensors="pt", **kw)["pixel_values_videos"][0]

    def warmup(self) -> None:
        import torch

        c = self.crop
        with torch.inference_mode():
            self.net(pixel_values_videos=torch.zeros(1, self.frames_per_clip, 3, c, c, dtype=self.dtype, device=self.device.local))
        self.warm = True

    def info(self) -> dict[str, Any]:
        return {**super().info(), "frames_per_clip": self.frames_per_clip, "num_labels": len(self.labels), "calls": self.calls, "clips": self.clips_classified}

    # -- hooks -------------------------------------------------------------
    def decode_clip(self, data: bytes) -> tuple[np.ndarray, bool]:
        """A clip container → (T x H x W x 3 uint8 RGB, whether it is already prepared)."""
        header, frames = clipc.unpack_clip(data)
        n = len(frames)
        if n != self.frames_per_clip:
            raise Unprocessable(f"got {n} frames; a clip is exactly {self.frames_per_clip} frames")
        w, h, fmt = int(header["width"]), int(header["height"]), str(header.get("format", "RGB")).upper()
        if w * h > self.settings.max_image_pixels:
            raise Unprocessable(f"frames of {w}x{h} are over MAX_IMAGE_PIXELS")
        out = np.empty((n, h, w, 3), np.uint8)
        for i, f in enumerate(frames):
            if len(f) == w * h * 3:
                a = np.frombuffer(f, np.uint8).reshape(h, w, 3)
                out[i] = a[:, :, ::-1] if fmt == "BGR" else a
            else:
                try:
                    a = decode_rgb(f, self.settings.max_image_pixels)
                except TrifectaError as e:
                    raise Unprocessable(f"frame {i} could not be decoded: {e.message}") from None
                if a.shape[:2] != (h, w):
                    raise Unprocessable(f"frame {i} is {a.shape[1]}x{a.shape[0]}; the clip says {w}x{h}")
                out[i] = a
        prepared = bool(header.get("prepared"))
        if prepared and (h, w) != (self.crop, self.crop):
            raise Unprocessable(f"a prepared clip must be {self.crop}x{self.crop}, got {w}x{h}")
        return out, prepared

    def prepare(self, item: Item) -> PreparedClip:
        if _POISON_CLIP is not None and item.req.params.get("parent") and item.req.params.get("index") == _POISON_CLIP:
            os._exit(17)  # the dead-letter tests' poison clip (TRIFECTA_ALLOW_CRASH=1 only)
        k = item.req.params.get("top_k", self.settings.vjepa2_top_k)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k:
            raise Unprocessable("top_k must be a positive integer")
        frames, prepared = self.decode_clip(item.data)
        return PreparedClip(self.to_tensor(frames, prepared), min(k, len(self.labels)))

    def predict(self, batch: list[PreparedClip]) -> list[list[dict[str, Any]]]:
        import torch

        x = torch.stack([b.x for b in batch]).to(self.device.local, dtype=self.dtype)
        with torch.inference_mode():
            probs = self.net(pixel_values_videos=x).logits.float().softmax(-1).cpu()
        self.clips_classified += len(batch)
        out = []
        for b, p in zip(batch, probs, strict=True):
            v, i = p.topk(b.top_k)
            out.append([{"label": self.labels[int(j)], "confidence": round(float(c), 6)} for c, j in zip(v, i, strict=True)])
        return out

    def finish(self, item: Item, prepared: PreparedClip, pred: list[dict[str, Any]]) -> Produced:
        return Produced(meta={"predictions": pred, "clip_id": str(uuid.UUID(item.req.id.split(".")[0])) if _is_hex(item.req.id) else item.req.id})

    def run_batch(self, items: list[Item], stats: BatchStats | None = None) -> list[Produced | TrifectaError]:
        if self.jobs is None:
            return super().run_batch(items, stats)
        # clips of a cancelled (or already failed) job are dropped before the model sees them
        ended = self.jobs.ended_parents({str(it.req.params["parent"]) for it in items if it.req.params.get("parent")})
        out: list[Produced | TrifectaError | None] = [None] * len(items)
        live = []
        for i, it in enumerate(items):
            parent = it.req.params.get("parent")
            if parent and str(parent) in ended:
                out[i] = Conflict(f"job {parent} is {ended[str(parent)]}; its remaining clips are dropped")
            else:
                live.append(i)
        for i, res in zip(live, super().run_batch([items[i] for i in live], stats) if live else [], strict=True):
            out[i] = res
        parts = [(items[i].req, out[i]) for i in live if items[i].req.params.get("parent")]
        if parts:
            try:
                self.jobs.record(parts)  # type: ignore[arg-type]
            except Exception:  # noqa: BLE001 - the clips' own results still go out
                log.exception("recording %d clip results failed", len(parts))
        return out  # type: ignore[return-value]

    def dropped(self, failed: list[tuple[InferRequest, dict[str, Any]]]) -> None:
        """A clip that never reached the model (dead-lettered, expired, input unreadable) is
        recorded with its job like a clip that failed in it, so the job still finishes."""
        parts = [(q, err) for q, err in failed if q.params.get("parent")]
        if parts and self.jobs is not None:
            self.jobs.record(parts)

    # -- video jobs ----------------------------------------------------------
    def extra_tasks(self, ctx: TaskContext) -> list[ExtraTask]:
        self.jobs = ClipJobs(self, ctx)
        jobs = self.jobs

        def video(job_id: str, chunk: int, first_clip: int, start_frame: int, start_pts: int | None = None) -> None:
            jobs.run_chunk(job_id, chunk, first_clip, start_frame, start_pts)

        return [ExtraTask(clipc.TASK_VIDEO, video, acks_late=True)]


def _poison_clip() -> int | None:
    """The dead-letter tests' poison: with TRIFECTA_ALLOW_CRASH=1 on the worker, the clip of a
    multi-clip job whose index is TRIFECTA_CRASH_CLIP kills its worker every time (as echo's
    `params.crash` does for a single request)."""
    if os.environ.get("TRIFECTA_ALLOW_CRASH") != "1":
        return None
    try:
        return int(os.environ["TRIFECTA_CRASH_CLIP"])
    except (KeyError, ValueError):
        return None


_POISON_CLIP = _poison_clip()


def _is_hex(job_id: str) -> bool:
    head = job_id.split(".")[0]
    return len(head) == 32 and all(c in "0123456789abcdef" for c in head)


def encode_frames(frames: np.ndarray) -> list[bytes]:
    from PIL import Image

    out = []
    for f in frames:
        bio = io.BytesIO()
        Image.fromarray(f).save(bio, format="JPEG", quality=JPEG_QUALITY)
        out.append(bio.getvalue())
    return out


# ---------------------------------------------------------------- multi-clip jobs (video, frames)
class ClipJobs:
    """Decode chunks of video jobs, record finished clips, assemble and finish parent jobs."""

    def __init__(self, runner: VJEPA2Runner, svc: Any) -> None:
        self.runner, self.svc = runner, svc
        self.settings: Settings = svc.settings
        self.r = svc.r
        self.qkeys = queuekeys.for_settings(self.settings)  # queue name -> Redis key (kombu's global_keyprefix)
        self.store: BlobStore = svc.store
        self._record = self.r.register_script(clipc.RECORD_LUA)
        self._emitted = self.r.register_script(clipc.EMITTED_LUA)
        self._chunk_start = self.r.register_script(clipc.CHUNK_START_LUA)
        self._finish = self.r.register_script(jobstore.FINISH_LUA)

    def ended_parents(self, parents: set[str]) -> dict[str, str]:
        """Of these parent jobs, the ones already finished or cancelled (job id → status)."""
        if not parents:
            return {}
        ids = sorted(parents)
        pipe = self.r.pipeline(transaction=False)
        for p in ids:
            pipe.hget(keys.job(p), "status")
        out = {}
        for p, st in zip(ids, pipe.execute(), strict=True):
            status = orjson.loads(st) if st else "expired"
            if status in keys.TERMINAL:
                out[p] = status
        return out

    # -- recording finished clips (called after each batch) -------------------
    def record(self, parts: list[tuple[InferRequest, Produced | TrifectaError | dict[str, Any]]]) -> None:
        """Record finished clips with their parent jobs: predictions, or the error (a clip that
        failed, even one dead-lettered before the model saw it); the last one assembles the job."""
        now = jobstore.now()
        ttl = self.settings.result_ttl_seconds
        pipe = self.r.pipeline(transaction=False)
        parents = []
        for req, res in parts:
            p = req.params
            entry: dict[str, Any] = {"index": int(p["index"]), "start_frame": p.get("f0"), "end_frame": p.get("f1"), "start": p.get("t0"), "end": p.get("t1")}
            if isinstance(res, Produced):
                entry["predictions"] = res.meta["predictions"]
            elif isinstance(res, dict):
                entry["error"] = {"code": res.get("code", "internal"), "message": res.get("message", "")}
            else:
                err = translate(res)
                entry["error"] = {"code": err.code, "message": err.message}
            parent = str(p["parent"])
            parents.append(parent)
            self._record(keys=[keys.job(parent), clipc.state_key(parent), clipc.done_key(parent)], args=[entry["index"], orjson.dumps(entry), now, ttl], client=pipe)
        for parent, (done, total) in zip(parents, pipe.execute(), strict=True):
            if total >= 0 and done >= total:
                self.assemble(parent)

    # -- finishing a parent -----------------------------------------------------
    def assemble(self, job_id: str) -> None:
        raw = self.r.hgetall(keys.job(job_id))
        if not raw:
            return
        rec = jobstore.parse_record(raw)
        if rec["status"] in keys.TERMINAL:
            return
        doc = orjson.loads(raw[b"doc"])
        state = _decode_hash(self.r.hgetall(clipc.state_key(job_id)))
        entries = sorted((orjson.loads(v) for v in self.r.hvals(clipc.done_key(job_id))), key=lambda e: e["index"])
        tenant = doc.get("tenant", "default")
        prefix = f"{tenant}/jobs/{job_id}"
        good = [e for e in entries if "predictions" in e]
        failed = [e for e in entries if "error" in e]
        fps = _num(state.get("fps"))
        frames = int(_num(state.get("frames")) or 0)
        timeline = {
            "job_id": job_id,
            "model": doc.get("model", MODEL),
            "kind": state.get("kind"),
            "input": doc.get("input", {}),
            "fps": fps,
            "frames": frames,
            "duration_s": _num(state.get("duration_s")) or (round(frames / fps, 6) if fps else None),
            "width": _num(state.get("width")),
            "height": _num(state.get("height")),
            "frames_per_clip": int(_num(state.get("per_clip")) or self.runner.frames_per_clip),
            "stride": _num(state.get("stride")),
            "frame_step": _num(state.get("frame_step")),
            "clips": entries,
        }
        data = orjson.dumps(timeline)
        path = f"{prefix}/timeline.json"
        now = jobstore.now()
        if not good:
            err = failed[0]["error"] if failed else {"code": "unprocessable", "message": "the job has no clips"}
            status, field, body = "failed", "error", {**err, "clips_failed": len(failed)}
        else:
            self.store.put(path, data, "application/json")
            out = Output(key="timeline", format="json", path=path, bytes=len(data), content_type="application/json")
            top1 = Counter(e["predictions"][0]["label"] for e in good if e["predictions"])
            meta: dict[str, Any] = {
                "clips": len(entries),
                "clips_failed": len(failed),
                "frames": frames,
                "fps": fps,
                "duration_s": timeline["duration_s"],
                "top_labels": [{"label": lbl, "clips": n} for lbl, n in top1.most_common(5)],
            }
            if len(entries) == 1 and good:
                meta["predictions"] = good[0]["predictions"]
                meta["clip_id"] = str(uuid.UUID(job_id)) if _is_hex(job_id) else job_id
            if len(entries) <= 64:
                meta["clip_results"] = [{k: e.get(k) for k in ("index", "start", "end", "start_frame", "end_frame", "predictions", "error") if k in e} for e in entries]
            status, field = "succeeded", "result"
            body = {
                "outputs": [out.model_dump()],
                "meta": meta,
                "timing": {"wall_ms": round((time.time() - float(doc.get("created_at") or time.time())) * 1000, 2), "clips": len(entries)},
                "worker": self.svc.worker_id,
                "device": str(self.svc.device),
                "trained": self.svc.runner.trained,
            }
            self.store.put(f"{prefix}/result.json", orjson.dumps({"job_id": job_id, "model": doc.get("model", MODEL), **body}), "application/json")
        landed = self._finish(keys=[keys.job(job_id)], args=[status, now, field, orjson.dumps(body), "", ""])
        if landed:
            log.info("job=%s model=%s device=%s status=%s clips=%d failed=%d", job_id, MODEL, self.svc.device, status, len(entries), len(failed))
            self._after_finish(job_id, doc, state)

    def fail(self, job_id: str, err: TrifectaError) -> None:
        raw = self.r.hgetall(keys.job(job_id))
        if not raw:
            return
        body = {"code": err.code, "message": err.message, "status": err.status}
        if self._finish(keys=[keys.job(job_id)], args=["failed", jobstore.now(), "error", orjson.dumps(body), "", ""]):
            log.info("job=%s model=%s status=failed %s: %s", job_id, MODEL, err.code, err.message)
            self._after_finish(job_id, orjson.loads(raw[b"doc"]), _decode_hash(self.r.hgetall(clipc.state_key(job_id))))

    def _after_finish(self, job_id: str, doc: dict[str, Any], state: dict[str, Any]) -> None:
        # (a callback_url's webhook was queued by FINISH_LUA itself.) The clips' own records
        # and the bookkeeping are done with; the timeline has it all
        total = int(_num(state.get("emitted")) or 0)
        pipe = self.r.pipeline(transaction=False)
        for i in range(total):
            pipe.unlink(keys.job(clipc.child_id(job_id, i)))
        pipe.unlink(clipc.done_key(job_id))
        pipe.expire(clipc.state_key(job_id), 600)
        pipe.execute()
        if state.get("kind") == "video" and state.get("uri"):
            from workers.video import forget_local

            forget_local(str(state["uri"]), self.store)

    # -- decoding a video, one chunk per task ------------------------------------
    def run_chunk(self, job_id: str, chunk: int, first_clip: int, start_frame: int, start_pts: int | None) -> None:
        s = self.settings
        st, n = self._chunk_start(keys=[keys.job(job_id), clipc.state_key(job_id)], args=[jobstore.now(), s.max_deliveries, chunk])
        st = st.decode() if isinstance(st, bytes) else st
        if st == "dead":
            log.error("job=%s video chunk %d dead-lettered after %d deliveries", job_id, chunk, int(n) - 1)
            self.r.lpush(keys.DEADLETTER, orjson.dumps({"id": job_id, "model": MODEL, "chunk": chunk, "deliveries": int(n) - 1, "at": jobstore.now()}))
            self.fail(job_id, DeadLettered(f"decode chunk {chunk} of this video was delivered {int(n) - 1} times without finishing (the worker died each time); not retried"))
            return
        if st != "running":
            log.info("job=%s video chunk %d skipped (status %s)", job_id, chunk, st)
            return
        state = _decode_hash(self.r.hgetall(clipc.state_key(job_id)))
        t0 = time.time()
        try:
            self._chunk(job_id, chunk, first_clip, start_frame, start_pts, state)
        except Exception as e:  # the job fails with the reason; the task itself succeeds (no redelivery)
            err = translate(e)
            if err.status >= 500 and not isinstance(e, TrifectaError):
                log.exception("job=%s video chunk %d failed", job_id, chunk)
            self.fail(job_id, err)
        log.info("job=%s video chunk %d (clips from %d) took %.2fs", job_id, chunk, first_clip, time.time() - t0)

    def _chunk(self, job_id: str, chunk: int, first_clip: int, start_frame: int, start_pts: int | None, state: dict[str, Any]) -> None:
        from workers.video import local_video, open_video

        s = self.settings
        per = int(_num(state.get("per_clip")) or self.runner.frames_per_clip)
        stride = int(_num(state.get("stride")) or s.clip_stride)
        step = int(_num(state.get("frame_step")) or 1)
        span = (per - 1) * step + 1
        n_chunk = s.video_chunk_clips
        last_clip = first_clip + n_chunk - 1
        needed_end = last_clip * stride + span - 1
        path = local_video(str(state["uri"]), self.store, s, tenant=str(state.get("tenant", "default")))
        frames: dict[int, np.ndarray] = {}
        times: dict[int, float] = {}
        pts_of: dict[int, int | None] = {}
        last_idx = -1
        eof = True
        deadline = time.monotonic() + s.video_decode_timeout_s
        with open_video(path, s) as v:
            info = v.info
            estimated = -1
            if chunk == 0:
                if info.frames_estimate > s.max_video_frames:
                    from tasks.errors import PayloadTooLarge

                    raise PayloadTooLarge(f"the video has about {info.frames_estimate} frames; the limit is {s.max_video_frames} (MAX_VIDEO_FRAMES)")
                if info.frames_estimate > 0:
                    estimated = max(1, (max(0, info.frames_estimate - span) + stride - 1) // stride + 1)
                self.r.hset(clipc.state_key(job_id), mapping={"fps": info.fps, "width": info.width, "height": info.height, "codec": info.codec, "duration_s": info.duration_s or ""})
            pending: list[tuple[int, np.ndarray]] = []  # resized a few frames at a time: one processor call per frame costs 6x

            def flush() -> None:
                for (i, _), crop in zip(pending, self.runner.resize_crop(np.stack([a for _, a in pending])), strict=True):
                    frames[i] = crop
                pending.clear()

            for idx, pts, t, rgb in v.frames(start_frame, start_pts, deadline):
                if idx > needed_end:
                    eof = False
                    break
                if pending and (len(pending) >= 16 or pending[0][1].shape != rgb.shape):
                    flush()
                pending.append((idx, rgb))
                times[idx] = t
                pts_of[idx] = pts
                last_idx = idx
            if pending:
                flush()
            fps = info.fps
        if last_idx < 0 and start_frame == 0:
            raise UnreadableVideo("the video has no decodable frames")
        made: list[tuple[int, list[int]]] = []  # (clip index, frame indices)
        c = first_clip
        while c <= last_clip and c * stride + span - 1 <= (needed_end if not eof else last_idx):
            made.append((c, [c * stride + j * step for j in range(per)]))
            c += 1
        total = -1
        if eof:
            n_frames = last_idx + 1 if last_idx >= 0 else start_frame
            last_full = made[-1][0] if made else first_clip - 1
            if last_full < 0:  # shorter than one clip: repeat its last frame
                made.append((0, [min(j * step, n_frames - 1) for j in range(per)]))
            elif last_full * stride + span - 1 < n_frames - 1 and n_frames >= span:  # tail frames no clip covers yet
                start = n_frames - span
                made.append((last_full + 1, [start + j * step for j in range(per)]))
            total = made[-1][0] + 1 if made else first_clip
        reqs = [self._clip_request(job_id, state, ci, idxs, frames, times, fps) for ci, idxs in made]
        pipe = self.r.pipeline(transaction=False)
        clipc.queue_children(pipe, reqs, s.result_ttl_seconds, self.qkeys)
        emitted = (made[-1][0] + 1) if made else first_clip
        self._emitted(keys=[keys.job(job_id), clipc.state_key(job_id), clipc.done_key(job_id)], args=[emitted, max(last_idx + 1, start_frame), total, estimated], client=pipe)
        res = pipe.execute()
        done, tot, status = res[-1]
        status = status.decode() if isinstance(status, bytes) else status
        if status in keys.TERMINAL:
            return
        if eof:
            if tot >= 0 and done >= tot:
                self.assemble(job_id)
            return
        nxt = last_clip + 1
        nstart = max(0, nxt * stride - stride)  # one stride back: the tail clip may need it
        msg = build_message(clipc.TASK_VIDEO, f"{job_id}:{chunk + 1}", {"job_id": job_id, "chunk": chunk + 1, "first_clip": nxt, "start_frame": nstart, "start_pts": pts_of.get(nstart)}, keys.shared_queue(MODEL))
        self.r.lpush(self.qkeys.queue(keys.shared_queue(MODEL)), msg)

    def _clip_request(self, job_id: str, state: dict[str, Any], index: int, idxs: list[int], frames: dict[int, np.ndarray], times: dict[int, float], fps: float) -> InferRequest:
        s = self.settings
        crop = self.runner.crop
        arr = np.stack([frames[i] for i in idxs])
        data = clipc.pack_clip(encode_frames(arr), crop, crop, "RGB", prepared=True)
        tenant = str(state.get("tenant", "default"))
        cid = clipc.child_id(job_id, index)
        if len(data) <= s.inline_input_bytes:
            import base64

            inp: dict[str, Any] = {"b64": base64.b64encode(data).decode("ascii"), "size": len(data)}
        else:
            key = f"{tenant}/jobs/{job_id}/_in/clip{index}"
            self.store.put(key, data)
            inp = {"uri": f"key:{key}", "size": len(data)}
        now = time.time()
        return InferRequest.model_validate(
            {
                "id": cid, "model": MODEL, "input": inp,
                "params": {"parent": job_id, "index": index, "f0": idxs[0], "f1": idxs[-1], "t0": round(times[idxs[0]], 6), "t1": round(times[idxs[-1]] + 1 / (fps or 25.0), 6), "top_k": int(_num(state.get("top_k")) or s.vjepa2_top_k)},
                "format": "png", "deadline": float(_num(state.get("deadline")) or now + s.result_ttl_seconds), "tenant": tenant, "kind": "job",
                "out_prefix": f"{tenant}/jobs/{job_id}/_clips/{index}", "created": now,
            }
        )


def _decode_hash(raw: dict[bytes, bytes]) -> dict[str, Any]:
    return {k.decode(): v.decode() for k, v in raw.items()}


def _num(v: Any) -> float | None:
    if v in (None, "", b""):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return int(f) if f.is_integer() else f


Runner = VJEPA2Runner  # the family registry's naming convention


# ---------------------------------------------------------------- checkpoints: tiny, bench, offline fallback
# A few Something-Something-v2 class names: the tiny checkpoint's id2label (written from this list, no download).
TINY_LABELS = [
    "Pushing something from left to right",
    "Pushing something from right to left",
    "Moving something up",
    "Moving something down",
    "Putting something on a surface",
    "Picking something up",
    "Turning something upside down",
    "Opening something",
    "Closing something",
    "Holding something",
]


def write_random(out: str, *, crop: int = 32, hidden: int = 32, layers: int = 2, heads: int = 2, labels: list[str] | None = None, source: str | None = None) -> str:
    """A random-init `VJEPA2ForVideoClassification` + video processor config, saved with `save_pretrained`."""
    import torch
    from transformers import VJEPA2Config, VJEPA2ForVideoClassification, VJEPA2VideoProcessor

    labels = labels or TINY_LABELS
    torch.manual_seed(0)
    cfg = VJEPA2Config(
        crop_size=crop, frames_per_clip=16, hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers, mlp_ratio=4.0,
        num_pooler_layers=1, pred_hidden_size=16, pred_num_attention_heads=2, pred_num_hidden_layers=1, pred_num_mask_tokens=2,
        id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
    )
    model = VJEPA2ForVideoClassification(cfg).eval()
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(d))
    VJEPA2VideoProcessor(crop_size=crop).save_pretrained(str(d))
    n_params = sum(p.numel() for p in model.parameters())
    desc = source or f"random-init V-JEPA 2 (hidden {hidden}, {layers} layers, crop {crop}, {n_params / 1e6:.2f} M parameters; UNTRAINED: labels are meaningless)"
    (d / "SOURCE.json").write_text(json.dumps({"source": desc, "revision": None, "pretrained": False}, indent=2))
    return str(d)


def write_tiny(out: str) -> str:
    return write_random(out)


def ensure(settings: Settings) -> str:
    """`trifecta up` with MODELS including vjepa2: the checkpoint if it can be fetched, else a tiny one (loudly)."""
    src = settings.vjepa2_checkpoint
    if (Path(src) / "config.json").is_file():
        return f"vjepa2: local checkpoint {src}"
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(src, allow_patterns=["*.json", "*.safetensors"], token=settings.hf_token, local_files_only=settings.hf_local_files_only)
        return f"vjepa2: hf://{src}"
    except Exception as e:  # noqa: BLE001 - offline, or the hub refused
        tiny = Path(settings.model_dir) / "vjepa2-tiny"
        if not (tiny / "config.json").is_file():
            write_tiny(str(tiny))
        os.environ["VJEPA2_CHECKPOINT"] = str(tiny)  # the workers `trifecta up` starts next inherit it
        _loud("vjepa2", src, e, tiny)
        return f"vjepa2: UNTRAINED tiny random-init checkpoint at {tiny}"


def _loud(name: str, src: str, e: Exception, tiny: Path) -> None:
    banner = "!" * 78
    msg = (
        f"\n{banner}\n! {name}: the checkpoint {src} cannot be fetched ({str(e).splitlines()[0][:100] if str(e) else type(e).__name__}).\n"
        f"! Falling back to an UNTRAINED tiny random-init checkpoint at {tiny}:\n"
        f"! the service runs end to end, but its answers are MEANINGLESS.\n"
        f"! Fetch the real one when online (unset HF_LOCAL_FILES_ONLY) or point the setting at a local directory.\n{banner}"
    )
    log.warning(msg)
    print(msg, flush=True)


def _register() -> None:
    from workers.tiny import register, register_ensure

    register(MODEL, write_tiny)
    register_ensure(MODEL, ensure)


_register()
