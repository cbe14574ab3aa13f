"""SAM3 video sessions held by a worker: decoded frames + tracking state, per session.

    return session_tasks(ctx, tracker)   # from a runner's `extra_tasks(ctx)` (sam3; echo for decode-only)

Gives the worker the `trifecta.video` Celery task (`tasks.sam3_video`). The parts live in
`workers/sam3video/`: `tracker.py` (the models), `sessions.py` (state and every call),
`propagate.py` (propagation jobs); this module wires them into a worker. The API
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
from typing import Any

import orjson

from tasks import jobstore
from tasks.errors import TrifectaError, translate
from tasks.sam3_video import TASK_VIDEO
from workers.runners.base import ExtraTask, TaskContext
from workers.sam3video.propagate import PropagateJob, expected_frames
from workers.sam3video.sessions import GeoPrompt, Session, SessionManager
from workers.sam3video.tracker import FrameResult, Sam3VideoTracker, merge_frames

__all__ = ["FrameResult", "GeoPrompt", "PropagateJob", "Sam3VideoTracker", "Session", "SessionManager", "expected_frames", "merge_frames", "session_tasks"]

log = logging.getLogger("trifecta.sam3_video")


def session_tasks(svc: TaskContext, tracker: Sam3VideoTracker | None) -> list[ExtraTask]:
    """The `trifecta.video` task and the session count (`sessions`, `max_sessions` in the registration hash) for a worker."""
    mgr = SessionManager(svc.settings, svc, tracker)
    svc.reg_fields["sessions"] = lambda: str(mgr.count)
    svc.reg_fields["max_sessions"] = lambda: str(svc.settings.max_sessions_per_worker)
    threading.Thread(target=mgr.reap_forever, args=(threading.Event(),), daemon=True, name="session-reaper").start()

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

    return [ExtraTask(TASK_VIDEO, video, acks_late=False)]
