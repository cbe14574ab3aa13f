"""Videos written with PyAV for the SAM3 video tests."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

W, H, FPS, N = 64, 48, 12, 12


def write_video(path: Path, frames: int = N, w: int = W, h: int = H) -> Path:
    """Moving shapes: a bright square crossing left to right and a disc going down."""
    with av.open(str(path), "w") as out:
        s = out.add_stream("mpeg4", rate=FPS)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        yy, xx = np.mgrid[0:h, 0:w]
        for i in range(frames):
            im = np.full((h, w, 3), 30, np.uint8)
            x = 4 + i * (w - 20) // max(1, frames - 1)
            im[10:26, x : x + 16] = (240, 40, 40)
            cy = 8 + i * (h - 16) // max(1, frames - 1)
            im[(yy - cy) ** 2 + (xx - w // 2) ** 2 < 36] = (40, 220, 60)
            for p in s.encode(av.VideoFrame.from_ndarray(im, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path


def read_frames(path: Path) -> list[np.ndarray]:
    """The video's frames as RGB arrays, decoded as the workers decode them (PyAV, rgb24)."""
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
