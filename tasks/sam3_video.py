"""SAM3 video sessions: the contract between the API routes and the workers holding sessions.

A session lives on one worker (its decoded frames and tracking state stay in that
process). The API records `tf:session:<id>` → {worker, queue, tenant, upload} in Redis
with a TTL and sends every call for the session to that worker's private queue as one
`trifecta.video` Celery task with kwargs `{"call": {"op", "session_id", "tenant", "args", "reply", "id"}}`.
The worker answers on the API's reply channel with `{"id", "status": "succeeded"|"failed",
"result"|"error"}` (the shape `Hub` already waits on). Ops: start, prompt, propagate,
status, remove_object, reset, close.
"""

from __future__ import annotations

import re
from typing import Any

from tasks.errors import Unprocessable
from tasks.keys import PREFIX

TASK_VIDEO = "trifecta.video"
OPS = ("start", "prompt", "propagate", "status", "remove_object", "reset", "close")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".flv")
DIRECTIONS = ("forward", "backward", "both")
_SID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def session_key(session_id: str) -> str:
    return f"{PREFIX}:session:{session_id}"


def check_session_id(v: Any) -> str:
    if not isinstance(v, str) or not _SID.match(v):
        raise Unprocessable("session_id must be 1-64 characters of letters, digits, '.', '_' or '-'")
    return v


def int_field(body: dict[str, Any], name: str, default: int | None = None, minimum: int = 0) -> int | None:
    v = body.get(name, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise Unprocessable(f"{name} must be an integer >= {minimum}, got {v!r}")
    return v


def check_frame(frame_index: int, total: int) -> None:
    """422 for a frame index outside the video (the worker knows the frame count)."""
    if not 0 <= frame_index < total:
        raise Unprocessable(f"frame_index {frame_index} is outside the video (frames 0..{total - 1})")
