"""A SAM3 video propagation run as a job (`"async": true`): record transitions, one JSON output per frame, progress and cancel."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import orjson

from tasks import jobstore, keys
from tasks.errors import TrifectaError
from tasks.sam3_video import FRAME_OUTPUT, JOB_KIND, session_key

if TYPE_CHECKING:
    from workers.runners.base import TaskContext
    from workers.sam3video.sessions import Session

log = logging.getLogger("trifecta.sam3_video")


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

    def __init__(self, svc: TaskContext, job_id: str, s: Session) -> None:
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
