"""Multi-clip V-JEPA 2 jobs on the worker (`video`, `frames`): decode chunks, clip recording, timeline assembly.

A video job is decoded in bounded pieces: the task `trifecta.vjepa2.video` decodes one chunk
(VIDEO_CHUNK_CLIPS clips), queues those clips as `trifecta.infer` messages (each resized and
centre-cropped here by the runner's `resize_crop`, shipped as JPEG) and then queues the next
chunk *behind* them — the queue's own order is the backpressure, no task ever waits for another.
Each finished clip is recorded beside the job (`tasks.jobstore.clips`); whoever records the last
one writes the timeline JSON to storage and finishes the job through the job store (which queues
its webhook, if any).
"""

from __future__ import annotations

import io
import logging
import time
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from storage.blob import BlobStore
from tasks import clips as clipc
from tasks import jobstore, keys, queuekeys
from tasks.errors import DeadLettered, TrifectaError, UnreadableVideo, translate
from tasks.jobstore import Jobs, error
from tasks.schemas import InferRequest, Output
from tasks.settings import Settings
from tasks.wire import build_message
from workers.runners.base import Produced, TaskContext

if TYPE_CHECKING:
    from workers.runners.vjepa2 import VJEPA2Runner

log = logging.getLogger("trifecta.vjepa2")
JPEG_QUALITY = 95  # prepared clip frames (already at the model's input size) travel as JPEG


def is_hex(job_id: str) -> bool:
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

    def __init__(self, runner: VJEPA2Runner, svc: TaskContext) -> None:
        self.runner, self.svc = runner, svc
        self.model = runner.model
        self.jobs = Jobs(svc.r)
        self.settings: Settings = svc.settings
        self.r = svc.r
        self.qkeys = queuekeys.for_settings(self.settings)  # queue name -> Redis key (kombu's global_keyprefix)
        self.store: BlobStore = svc.store
        self._record = self.r.register_script(clipc.RECORD_LUA)
        self._emitted = self.r.register_script(clipc.EMITTED_LUA)
        self._chunk_start = self.r.register_script(clipc.CHUNK_START_LUA)

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
            elif isinstance(res, dict):  # already an error dict (a clip dropped before the model)
                entry["error"] = error(res.get("code", "internal"), res.get("message", ""), status=res.get("status"))
            else:
                entry["error"] = error(res)
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
            "model": doc.get("model", self.model),
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
        if not good:
            err = failed[0]["error"] if failed else error("unprocessable", "the job has no clips")
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
                meta["clip_id"] = str(uuid.UUID(job_id)) if is_hex(job_id) else job_id
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
            self.store.put(f"{prefix}/result.json", orjson.dumps({"job_id": job_id, "model": doc.get("model", self.model), **body}), "application/json")
        if self.jobs.finish(job_id, status, field, body):
            log.info("job=%s model=%s device=%s status=%s clips=%d failed=%d", job_id, self.model, self.svc.device, status, len(entries), len(failed))
            self._after_finish(job_id, doc, state)

    def fail(self, job_id: str, err: TrifectaError) -> None:
        raw = self.r.hgetall(keys.job(job_id))
        if not raw:
            return
        if self.jobs.fail(job_id, err):
            log.info("job=%s model=%s status=failed %s: %s", job_id, self.model, err.code, err.message)
            self._after_finish(job_id, orjson.loads(raw[b"doc"]), _decode_hash(self.r.hgetall(clipc.state_key(job_id))))

    def _after_finish(self, job_id: str, doc: dict[str, Any], state: dict[str, Any]) -> None:
        # (a callback_url's webhook was queued by the job store's finish itself.) The clips' own records
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
            pipe = self.r.pipeline(transaction=False)
            jobstore.dead_letter(pipe, {"id": job_id, "model": self.model, "chunk": chunk, "deliveries": int(n) - 1, "at": jobstore.now()})
            pipe.execute()
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
        msg = build_message(clipc.TASK_VIDEO, f"{job_id}:{chunk + 1}", {"job_id": job_id, "chunk": chunk + 1, "first_clip": nxt, "start_frame": nstart, "start_pts": pts_of.get(nstart)}, keys.shared_queue(self.model))
        self.r.lpush(self.qkeys.queue(keys.shared_queue(self.model)), msg)

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
                "id": cid, "model": self.model, "input": inp,
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
