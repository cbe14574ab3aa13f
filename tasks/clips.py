"""V-JEPA 2 clips between the API, the video decode tasks and the workers.

A clip (VJEPA2_FRAMES_PER_CLIP frames) travels as one `trifecta.infer` input, a small
container the API and the workers both read:

    b"TFCLIP1\\n" | uint32 big-endian header length | header JSON | frame bytes back to back

    header = {"width", "height", "format": "BGR" | "RGB", "sizes": [bytes of each frame], "prepared": bool}

A frame is raw pixels (width*height*3 bytes in `format` channel order) or an encoded
JPEG/PNG/WebP image of that size (an encoded image carries its own colours, so `format`
only concerns raw frames). `prepared` clips were cut from a video by a worker and are
already resized and centre-cropped to the model's input.

A job of many clips (a whole video, or `frames` holding several clips) is a parent job
record `tf:job:<id>` and one child request per clip (`<id>.<index>`, not listed among the
tenant's jobs). Its bookkeeping lives beside the record:

    tf:clips:<id>:state   hash  total (-1 until the video is decoded to its end), emitted,
                                frames, fps, ... and per decode-chunk delivery counters
    tf:clips:<id>:done    hash  clip index → the clip's result JSON

The scripts below keep the parent's `progress` field in step with them; whoever records
the last clip (a worker, or the decode task that learns the total) assembles the result.
"""

from __future__ import annotations

import base64
import binascii
import struct
from typing import Any

import orjson

from tasks import jobstore, keys
from tasks.errors import Unprocessable
from tasks.images import probe
from tasks.queuekeys import QueueKeys

MAGIC = b"TFCLIP1\n"
_LEN = struct.Struct(">I")
TASK_VIDEO = "trifecta.vjepa2.video"  # one decode chunk of a video job (runs on a vjepa2 worker)
CHANNEL_FORMATS = ("BGR", "RGB")
ENCODED_FORMATS = ("JPEG", "PNG", "WEBP")


def state_key(job_id: str) -> str:
    return f"{keys.PREFIX}:clips:{job_id}:state"


def done_key(job_id: str) -> str:
    return f"{keys.PREFIX}:clips:{job_id}:done"


def child_id(job_id: str, index: int) -> str:
    return f"{job_id}.{index}"


# ---------------------------------------------------------------- the container
def pack_clip(frames: list[bytes], width: int, height: int, fmt: str = "RGB", prepared: bool = False) -> bytes:
    header = orjson.dumps({"width": width, "height": height, "format": fmt, "sizes": [len(f) for f in frames], "prepared": prepared})
    return b"".join([MAGIC, _LEN.pack(len(header)), header, *frames])


def unpack_clip(data: bytes) -> tuple[dict[str, Any], list[bytes]]:
    """(header, frames); raises Unprocessable on anything that is not a whole container."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _LEN.size:
        raise Unprocessable("the input is not a clip (send frames to /api/v1/infer or as a `frames` job)")
    (n,) = _LEN.unpack_from(data, len(MAGIC))
    off = len(MAGIC) + _LEN.size
    try:
        header = orjson.loads(data[off : off + n])
        sizes = [int(s) for s in header["sizes"]]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        raise Unprocessable("the clip header is corrupt") from None
    off += n
    if off + sum(sizes) != len(data) or any(s < 0 for s in sizes):
        raise Unprocessable("the clip is truncated")
    frames = []
    for s in sizes:
        frames.append(data[off : off + s])
        off += s
    return header, frames


# ---------------------------------------------------------------- request validation (API side)
def check_frames(frames: Any, width: Any, height: Any, fmt: Any, *, per_clip: int, max_pixels: int, multiple: bool = False) -> tuple[list[bytes], int, int, str]:
    """The decoded frames of a request, or 422 saying what is wrong with which frame.

    Checks the count (exactly `per_clip`, or a positive multiple of it when `multiple`),
    base64, and each frame's size: raw frames by their length, encoded ones by their
    header (nothing is decoded here: a frame whose pixels are corrupt fails on the worker,
    also as 422).
    """
    if not isinstance(frames, list) or not frames:
        raise Unprocessable(f"`frames` must be a list of {per_clip} base64 frames")
    n = len(frames)
    if multiple:
        if n % per_clip:
            raise Unprocessable(f"got {n} frames; a clip is {per_clip} frames, so send a multiple of {per_clip}")
    elif n != per_clip:
        raise Unprocessable(f"got {n} frames; a clip is exactly {per_clip} frames")
    if not isinstance(width, int) or not isinstance(height, int) or isinstance(width, bool) or isinstance(height, bool) or width < 1 or height < 1:
        raise Unprocessable("`width` and `height` must be positive integers (the frames' size in pixels)")
    if width * height > max_pixels:
        raise Unprocessable(f"frames of {width}x{height} are over the {max_pixels}-pixel limit (MAX_IMAGE_PIXELS)")
    f = str(fmt or "BGR").upper()
    if f not in CHANNEL_FORMATS:
        raise Unprocessable(f"`format` must be BGR or RGB, got {fmt!r}")
    raw_len = width * height * 3
    out: list[bytes] = []
    for i, b64 in enumerate(frames):
        if not isinstance(b64, str):
            raise Unprocessable(f"frame {i} is not a base64 string")
        try:
            data = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise Unprocessable(f"frame {i} is not valid base64") from None
        if len(data) != raw_len:
            try:
                kind, w, h = probe(data, max(max_pixels, 1))
            except Exception:  # noqa: BLE001 - any probe failure means: neither raw nor an image
                raise Unprocessable(f"frame {i} is neither {width}x{height} raw {f} pixels ({raw_len} bytes) nor a readable JPEG/PNG image (it has {len(data)} bytes)") from None
            if kind not in ENCODED_FORMATS:
                raise Unprocessable(f"frame {i} is a {kind} image; encoded frames must be JPEG, PNG or WebP")
            if (w, h) != (width, height):
                raise Unprocessable(f"frame {i} is {w}x{h}; the request says {width}x{height}")
        out.append(data)
    return out, width, height, f


# ---------------------------------------------------------------- multi-clip bookkeeping (Lua)
_PROGRESS = """
local function progress(job, state, done)
  local n = redis.call('HLEN', done)
  local total = tonumber(redis.call('HGET', state, 'total') or '-1')
  local est = tonumber(redis.call('HGET', state, 'estimated') or '-1')
  local p = {done = n, clips_done = n,
             clips_emitted = tonumber(redis.call('HGET', state, 'emitted') or '0'),
             frames_decoded = tonumber(redis.call('HGET', state, 'frames') or '0')}
  if total >= 0 then
    p.total = total
    p.clips_total = total
  elseif est >= 0 then
    p.total = math.max(est, n)
    p.estimated = true
  end
  redis.call('HSET', job, 'progress', cjson.encode(p))
  return {n, total}
end
local function terminal(st)
  return st == 'succeeded' or st == 'failed' or st == 'cancelled' or st == 'expired'
end
"""

# KEYS[1]=job KEYS[2]=state KEYS[3]=done  ARGV[1]=index ARGV[2]=result json ARGV[3]=now ARGV[4]=ttl
# → {clips done, total (-1 unknown)}; {-1, -1} when the parent is gone or already finished
RECORD_LUA = _PROGRESS + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {-1, -1} end
st = cjson.decode(st)
if terminal(st) then return {-1, -1} end
if st == 'queued' then redis.call('HSET', KEYS[1], 'status', '"running"', 'started_at', ARGV[3]) end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[4]))
return progress(KEYS[1], KEYS[2], KEYS[3])
"""

# KEYS[1]=job KEYS[2]=state KEYS[3]=done  ARGV[1]=clips emitted so far ARGV[2]=frames decoded so far
# ARGV[3]=total clips when the video ended in this chunk, else -1 ARGV[4]=estimated total or -1
# → {clips done, total, status}
EMITTED_LUA = _PROGRESS + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {-1, -1, 'missing'} end
st = cjson.decode(st)
if terminal(st) then return {-1, -1, st} end
redis.call('HSET', KEYS[2], 'emitted', ARGV[1], 'frames', ARGV[2])
if tonumber(ARGV[3]) >= 0 then redis.call('HSET', KEYS[2], 'total', ARGV[3]) end
if tonumber(ARGV[4]) >= 0 then redis.call('HSET', KEYS[2], 'estimated', ARGV[4]) end
local r = progress(KEYS[1], KEYS[2], KEYS[3])
return {r[1], r[2], st}
"""

# KEYS[1]=job KEYS[2]=state  ARGV[1]=now ARGV[2]=max deliveries ARGV[3]=chunk number
# → {status, deliveries}; status 'dead' when this chunk was delivered too often (the caller then
# fails the job through jobstore.FINISH_LUA, which also queues its webhook)
CHUNK_START_LUA = _PROGRESS + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'missing', 0} end
st = cjson.decode(st)
if terminal(st) then return {st, 0} end
local n = redis.call('HINCRBY', KEYS[2], 'deliveries:' .. ARGV[3], 1)
if n > tonumber(ARGV[2]) then return {'dead', n} end
if st == 'queued' then redis.call('HSET', KEYS[1], 'status', '"running"', 'started_at', ARGV[1]) end
return {'running', n}
"""


def queue_parent(pipe: Any, doc: dict[str, Any], state: dict[str, Any], ttl: int) -> None:
    """Add the parent job record (listed among the tenant's jobs) and its state to a pipeline."""
    k = keys.job(doc["id"])
    pipe.hset(k, mapping=jobstore.new_record(doc))
    jobstore.keep(pipe, doc["id"], doc["tenant"], ttl, doc["created_at"])
    pipe.hset(state_key(doc["id"]), mapping={k2: orjson.dumps(v) if isinstance(v, (dict, list)) else str(v) for k2, v in state.items()})
    pipe.expire(state_key(doc["id"]), ttl)


def queue_children(pipe: Any, reqs: list[Any], ttl: int, qkeys: QueueKeys) -> None:
    """Add each clip's own record and its `trifecta.infer` message to a pipeline (sync or asyncio);
    `qkeys` names the queue's Redis key (`tasks.queuekeys.for_settings`)."""
    from tasks.wire import build_message

    for q in reqs:
        k = keys.job(q.id)
        pipe.hset(k, mapping=jobstore.new_record({"id": q.id, "model": q.model, "kind": "clip", "tenant": q.tenant, "created_at": q.created, "params": q.params}))
        pipe.expire(k, ttl)
        queue = keys.shared_queue(q.model)
        pipe.lpush(qkeys.queue(queue), build_message(keys.TASK_INFER, q.id, {"req": q.model_dump(exclude_none=True)}, queue))
