"""Inputs for the V-JEPA 2 clip tests: synthetic frames and an MPEG-4 video written with PyAV.

frames = frames_rgb(7)                     # 16 shifted copies of one random 64x48 frame
clip = pack_clip([png(f) for f in frames], W, H, "RGB")
decoded = write_video(tmp / "v.mp4")       # N_FRAMES frames at FPS; returns them as PyAV decodes them
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

W, H, FPS, N_FRAMES = 64, 48, 25, 70


def frames_rgb(seed: int, n: int = 16) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    return [np.roll(base, 3 * i, axis=1) for i in range(n)]


def png(a: np.ndarray) -> bytes:
    bio = io.BytesIO()
    Image.fromarray(a).save(bio, format="PNG")
    return bio.getvalue()


def write_video(path: Path, n: int = N_FRAMES) -> list[np.ndarray]:
    """A synthetic MPEG-4 video written with PyAV; returns its frames as PyAV decodes them back."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=FPS)
        s.width, s.height, s.pix_fmt, s.gop_size = W, H, "yuv420p", 10
        for i in range(n):
            a = np.zeros((H, W, 3), np.uint8)
            a[..., 0] = (i * 7) % 256
            a[..., 2] = 255 - (i * 3) % 256
            a[10:30, (i % 40) : (i % 40) + 16, 1] = 250
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
