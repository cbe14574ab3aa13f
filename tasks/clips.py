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
record and one child request per clip; its bookkeeping (keys, scripts, creation) is in
`tasks.jobstore.clips`, re-exported here.
"""

from __future__ import annotations

import base64
import binascii
import struct
from typing import Any

import orjson

from tasks.errors import Unprocessable
from tasks.images import probe

# the multi-clip job's bookkeeping lives with the job store; named here too for the clip's users
from tasks.jobstore.clips import CHUNK_START_LUA, EMITTED_LUA, RECORD_LUA, child_id, done_key, queue_children, queue_parent, state_key  # noqa: F401

MAGIC = b"TFCLIP1\n"
_LEN = struct.Struct(">I")
TASK_VIDEO = "trifecta.vjepa2.video"  # one decode chunk of a video job (runs on a vjepa2 worker)
CHANNEL_FORMATS = ("BGR", "RGB")
ENCODED_FORMATS = ("JPEG", "PNG", "WEBP")


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
