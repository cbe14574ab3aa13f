"""SAM3 video sessions: the contract between the API routes and the workers holding sessions.

A session lives on one worker (its decoded frames and tracking state stay in that
process). Session ids are per tenant: the API records `tf:session:<tenant>:<id>` →
{worker, queue, tenant, upload} in Redis with a TTL, and the tenant's open ids in the set
`tf:sessions:<tenant>` (its MAX_SESSIONS_PER_TENANT quota, checked atomically at start); a worker keys its
sessions by (tenant, id), so two tenants may use the same id and neither learns of the other's and sends every call for the session to that worker's private queue as one
`trifecta.video` Celery task with kwargs `{"call": {"op", "session_id", "tenant", "args", "reply", "id"}}`.
The worker answers on the API's reply channel with `{"id", "status": "succeeded"|"failed",
"result"|"error"}` (the shape `Hub` already waits on). Ops: start, prompt, propagate,
status, remove_object, reset, close.

A prompt call (`session/{id}/prompt`) carries `prompts` in one of two shapes, checked here
by both halves (`parse_prompts`):

    [{"type": "text", "text": "person"}, ...]                 # text: every matching object (Sam3VideoModel)
    [{"type": "box", "box": [cx, cy, w, h]},                  # box and/or points: ONE object (the tracker,
     {"type": "point", "point": [x, y], "label": 1}, ...]     #   Sam3TrackerVideoModel), `obj_id` or a new id

Boxes are `[cx, cy, w, h]` and points `[x, y]`, normalised to [0, 1] by the frame's width
and height (the image API's convention); a point's label is 1 (on the object) or 0 (not
on it). A box/point call replaces that object's inputs on that frame.

A propagate call with `"async": true` is a job (`/v1/jobs/<id>`): the API writes the job
record and sends the call with `args.job`; the worker marks it running, writes each frame's
objects to `<tenant>/jobs/<id>/frames/<index>.json`, keeps `progress` `{"done", "total"}`
current, stops at a cancel, and finishes the job with one output per frame.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from tasks.errors import Unprocessable, shown
from tasks.keys import PREFIX
from tasks.sam3 import MAX_TEXT_CHARS, is_finite_number, parse_box

TASK_VIDEO = "trifecta.video"
OPS = ("start", "prompt", "propagate", "status", "remove_object", "reset", "close")
JOB_KIND = "video-propagate"  # the `kind` of a propagate job's record
FRAME_OUTPUT = "frames/{:06d}.json"  # a propagate job's per-frame output, under <tenant>/jobs/<job id>/
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".flv")
DIRECTIONS = ("forward", "backward", "both")
_SID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def session_key(tenant: str, session_id: str) -> str:
    return f"{PREFIX}:session:{tenant}:{session_id}"


def tenant_sessions_key(tenant: str) -> str:
    return f"{PREFIX}:sessions:{tenant}"


# Claims a session id for a tenant within its quota, atomically (two starts cannot both take
# the last place). KEYS: the tenant's id set, the session key. ARGV: id, quota, worker, the
# session key prefix of the tenant, set TTL. Ids whose session key expired leave the set here.
# Returns the tenant's open sessions before this one, -1 for an id in use, -2 over the quota.
CLAIM_LUA = """
local n = 0
for _, sid in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[4] .. sid) == 1 then n = n + 1 else redis.call('SREM', KEYS[1], sid) end
end
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
if n >= tonumber(ARGV[2]) then return -2 end
redis.call('HSET', KEYS[2], 'worker', ARGV[3])
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return n
"""


def check_session_id(v: Any) -> str:
    if not isinstance(v, str) or not _SID.match(v):
        raise Unprocessable("session_id must be 1-64 characters of letters, digits, '.', '_' or '-'")
    return v


def int_field(body: dict[str, Any], name: str, default: int | None = None, minimum: int = 0) -> int | None:
    v = body.get(name, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise Unprocessable(f"{name} must be an integer >= {minimum}, got {shown(v)}")
    return v


def check_frame(frame_index: int, total: int) -> None:
    """422 for a frame index outside the video (the worker knows the frame count)."""
    if not 0 <= frame_index < total:
        raise Unprocessable(f"frame_index {frame_index} is outside the video (frames 0..{total - 1})")


# ---------------------------------------------------------------- prompts
@dataclass(frozen=True)
class VideoPrompt:
    """One prompt call: text prompts, or the box and points of one object (never both)."""

    texts: tuple[str, ...] = ()
    box: tuple[float, float, float, float] | None = None  # cx, cy, w, h normalised
    points: tuple[tuple[float, float], ...] = field(default_factory=tuple)  # x, y normalised
    labels: tuple[int, ...] = ()  # per point: 1 on the object, 0 not on it

    @property
    def geometric(self) -> bool:
        return self.box is not None or bool(self.points)

    def wire(self) -> list[dict[str, Any]]:
        """Back to the request shape (what the API sends the worker, normalised)."""
        out: list[dict[str, Any]] = [{"type": "text", "text": t} for t in self.texts]
        if self.box is not None:
            out.append({"type": "box", "box": list(self.box)})
        out += [{"type": "point", "point": list(p), "label": lab} for p, lab in zip(self.points, self.labels, strict=True)]
        return out


_EXAMPLE = '[{"type": "text", "text": "person"}] or [{"type": "box", "box": [cx, cy, w, h]}, {"type": "point", "point": [x, y], "label": 1}]'


def _point(raw: Any, where: str) -> tuple[float, float]:
    if not isinstance(raw, (list, tuple)) or len(raw) != 2:
        raise Unprocessable(f"{where} must be [x, y] (2 numbers normalised to [0, 1] by the frame's width and height), got {shown(raw)}")
    xy = []
    for v in raw:
        if not is_finite_number(v):
            raise Unprocessable(f"{where} must be [x, y] of finite numbers, got {shown(raw)}")
        xy.append(float(v))
    if not all(0.0 <= v <= 1.0 for v in xy):
        raise Unprocessable(f"{where} {shown(list(raw))} is outside the frame; points are [x, y] normalised to [0, 1] by the frame's width and height")
    return xy[0], xy[1]


def _label(raw: Any, where: str) -> int:
    if isinstance(raw, bool):
        return int(raw)
    if isinstance(raw, int) and raw in (0, 1):
        return raw
    raise Unprocessable(f"{where} must be 1 (a point on the object) or 0 (a point not on it), got {shown(raw)}")


def parse_prompts(raw: Any, *, max_prompts: int) -> VideoPrompt:
    """A prompt call's `prompts` → `VideoPrompt`; 422 with what was wrong and the expected shape."""
    if not isinstance(raw, list) or not raw:
        raise Unprocessable(f"prompts must be a non-empty list like {_EXAMPLE}")
    if len(raw) > max_prompts:
        raise Unprocessable(f"prompts has {len(raw)} entries; at most {max_prompts} are accepted (MAX_PROMPTS)")
    texts: list[str] = []
    boxes: list[tuple[float, float, float, float]] = []
    points: list[tuple[float, float]] = []
    labels: list[int] = []
    for i, p in enumerate(raw):
        here = f"prompts[{i}]"
        if isinstance(p, str):
            p = {"type": "text", "text": p}
        if not isinstance(p, dict):
            raise Unprocessable(f"{here} must be an object with a `type` (text, box or point), like {_EXAMPLE}")
        kind = p.get("type", "text" if "text" in p else None)
        if kind == "text":
            t = p.get("text")
            if not isinstance(t, str) or not t.strip():
                raise Unprocessable(f'{here}.text must be a non-empty string: {{"type": "text", "text": "person"}}')
            t = " ".join(t.split())
            if len(t) > MAX_TEXT_CHARS:
                raise Unprocessable(f"{here}.text is {len(t)} characters; at most {MAX_TEXT_CHARS}")
            texts.append(t)
        elif kind == "box":
            b = parse_box(p.get("box"), True, f"{here}.box")
            if not _label(p.get("label", True), f"{here}.label"):
                raise Unprocessable(f"{here} is a negative box; a video object is prompted with one positive box (mark what is not the object with points of label 0)")
            boxes.append((b.cx, b.cy, b.w, b.h))
        elif kind == "point":
            points.append(_point(p.get("point"), f"{here}.point"))
            labels.append(_label(p.get("label", 1), f"{here}.label"))
        else:
            raise Unprocessable(f"{here} has unknown type {shown(kind)}; video prompts are text, box or point")
    if texts and (boxes or points):
        raise Unprocessable("a prompt call is either text prompts (every matching object) or the box/points of one object; send them in separate calls")
    if len(boxes) > 1:
        raise Unprocessable(f"prompts has {len(boxes)} boxes; a box prompts one object: send one call per object (with its obj_id)")
    return VideoPrompt(tuple(texts), boxes[0] if boxes else None, tuple(points), tuple(labels))
