"""Reading videos with PyAV, within limits: frame size, frame count and decode time.

    path = local_video(uri, store, settings)        # a seekable local file for any input URI
    with open_video(path, settings) as v:            # VideoInfo checked against MAX_VIDEO_PIXELS
        for idx, pts, t, rgb in v.frames(start_frame, start_pts, deadline):
            ...

`frames` can start in the middle: it seeks to the keyframe before `start_pts` and skips
forward, so a long video is read in bounded pieces by successive tasks. Frame indices count
decoded frames from the start of the stream (presentation order).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from storage.blob import BlobStore, FileStore
from tasks.errors import PayloadTooLarge, Unprocessable, UnreadableVideo
from tasks.inputs import STAGED, check_worker_input, local_path, open_uri
from tasks.settings import Settings

log = logging.getLogger("trifecta.video")
CACHE_DIR = Path(tempfile.gettempdir()) / "trifecta-videos"
CACHE_MAX_AGE_S = 6 * 3600


@dataclass
class VideoInfo:
    width: int
    height: int
    fps: float
    frames_estimate: int  # from the container's header; -1 when it does not say
    duration_s: float | None
    codec: str


def local_video(uri: str, store: BlobStore, settings: Settings, tenant: str | None = None) -> Path:
    """A local, seekable path for a video input (PyAV needs to seek in MP4s).

    Our own file store and allowed `file://` paths are read in place; anything in S3 is
    downloaded once per worker into a cache keyed by the URI, at most MAX_VIDEO_BYTES.
    With `tenant`, the URI is checked for that tenant first (`check_worker_input`, 403).
    """
    if tenant is not None:
        check_worker_input(uri, tenant, settings)
    if uri.startswith(STAGED) and isinstance(store, FileStore):
        p = store.root / uri[len(STAGED) :]
        if not p.resolve().is_relative_to(store.root) or not p.is_file():
            raise UnreadableVideo(f"the uploaded video is missing from storage ({uri})")
        return p
    if uri.startswith("file://") or uri.startswith("/"):
        p = local_path(uri, settings)
        if not p.is_file():
            raise UnreadableVideo(f"no video at {uri}")
        return p
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    target = CACHE_DIR / hashlib.sha1(f"{store.url}|{uri}".encode()).hexdigest()
    if target.is_file():
        os.utime(target)
        return target
    _sweep_cache()
    fd, tmp = tempfile.mkstemp(dir=CACHE_DIR, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out, open_uri(uri, store, settings) as src:
            n = 0
            while True:
                chunk = src.read(1 << 20)
                if not chunk:
                    break
                n += len(chunk)
                if n > settings.max_video_bytes:
                    raise PayloadTooLarge(f"the video at {uri} is over {settings.max_video_bytes} bytes (MAX_VIDEO_BYTES)")
                out.write(chunk)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def forget_local(uri: str, store: BlobStore) -> None:
    """Drop a downloaded copy once its job is done (copies in place are left alone)."""
    (CACHE_DIR / hashlib.sha1(f"{store.url}|{uri}".encode()).hexdigest()).unlink(missing_ok=True)


def _sweep_cache() -> None:
    now = time.time()
    for p in CACHE_DIR.glob("*"):
        try:
            if now - p.stat().st_mtime > CACHE_MAX_AGE_S:
                p.unlink(missing_ok=True) if p.is_file() else shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


class Video:
    """An open video stream; use as a context manager."""

    def __init__(self, path: Path, settings: Settings) -> None:
        import av

        self.settings = settings
        try:
            self.container = av.open(str(path), mode="r", options={"probesize": "10000000"})
        except Exception as e:  # noqa: BLE001 - PyAV raises many error types for one cause
            raise UnreadableVideo(f"the video cannot be opened: {_av_message(e)}") from None
        if not self.container.streams.video:
            self.container.close()
            raise UnreadableVideo("the file has no video stream")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"
        cc = self.stream.codec_context
        w, h = int(cc.width or 0), int(cc.height or 0)
        if w <= 0 or h <= 0:
            self.container.close()
            raise UnreadableVideo("the video stream has no frame size")
        if w * h > settings.max_video_pixels:
            self.container.close()
            raise PayloadTooLarge(f"video frames are {w}x{h} = {w * h} pixels; the limit is {settings.max_video_pixels} (MAX_VIDEO_PIXELS)")
        rate = self.stream.average_rate or self.stream.guessed_rate or Fraction(25)
        fps = float(rate) if rate else 25.0
        dur = None
        if self.stream.duration and self.stream.time_base:
            dur = float(self.stream.duration * self.stream.time_base)
        elif self.container.duration:
            dur = self.container.duration / 1_000_000
        est = int(self.stream.frames or 0) or (int(round(dur * fps)) if dur else -1)
        self.info = VideoInfo(w, h, fps, est, dur, cc.name or "?")

    def __enter__(self) -> Video:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.container.close()

    def frames(self, start_frame: int = 0, start_pts: int | None = None, deadline: float | None = None) -> Iterator[tuple[int, int | None, float, np.ndarray]]:
        """(index, pts, seconds, H x W x 3 uint8 RGB) from `start_frame` on (whose pts is `start_pts`)."""
        s = self.settings
        tb = float(self.stream.time_base) if self.stream.time_base else None
        skip_count = 0
        if start_frame > 0 and start_pts is not None:
            try:
                self.container.seek(start_pts, stream=self.stream, backward=True, any_frame=False)
            except Exception as e:  # noqa: BLE001
                raise UnreadableVideo(f"cannot seek in the video: {_av_message(e)}") from None
        elif start_frame > 0:
            skip_count = start_frame  # no timestamps to seek by: decode from the start and count
        idx = start_frame
        seen = 0
        try:
            for frame in self.container.decode(self.stream):
                if deadline is not None and time.monotonic() > deadline:
                    raise Unprocessable(f"decoding took longer than {s.video_decode_timeout_s:g} s (VIDEO_DECODE_TIMEOUT_S) by frame {idx}")
                if start_pts is not None and start_frame > 0 and frame.pts is not None and frame.pts < start_pts:
                    continue  # between the keyframe we landed on and where this piece starts
                if seen < skip_count:
                    seen += 1
                    continue
                if idx >= s.max_video_frames:
                    raise PayloadTooLarge(f"the video has more than {s.max_video_frames} frames (MAX_VIDEO_FRAMES)")
                if frame.width * frame.height > s.max_video_pixels:
                    raise PayloadTooLarge(f"frame {idx} is {frame.width}x{frame.height}; the limit is {s.max_video_pixels} pixels (MAX_VIDEO_PIXELS)")
                t = float(frame.pts * tb) if (frame.pts is not None and tb) else idx / self.info.fps
                yield idx, frame.pts, t, frame.to_ndarray(format="rgb24")
                idx += 1
        except (PayloadTooLarge, Unprocessable):
            raise
        except Exception as e:  # noqa: BLE001 - corrupt packets, unsupported codecs
            if type(e).__module__.startswith("av"):
                raise UnreadableVideo(f"the video could not be decoded past frame {idx}: {_av_message(e)}") from None
            raise


def open_video(path: Path, settings: Settings) -> Video:
    return Video(path, settings)


def _av_message(e: Exception) -> str:
    return str(e).split("\n")[0][:200] or type(e).__name__
