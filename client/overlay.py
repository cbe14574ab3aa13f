"""`trifecta overlay IMAGE MASK`: the mask drawn over the photo, as a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from storage import codecs


def load_mask(path: str) -> np.ndarray:
    data = Path(path).read_bytes()
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return codecs.decode_png(data)
    if data[:1] == b"{":
        return codecs.decode(data, "rle")
    return codecs.decode_packbits(data)


def overlay(rgb: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (255, 0, 80), alpha: float = 0.5) -> np.ndarray:
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match image {rgb.shape[:2]}")
    out = rgb.astype(np.float32)
    out[mask] = out[mask] * (1 - alpha) + np.asarray(color, np.float32) * alpha
    return out.astype(np.uint8)


def overlay_files(image: str, mask: str, output: str) -> None:
    from tasks.images import decode_rgb

    rgb = decode_rgb(Path(image).read_bytes(), 1 << 31)
    Image.fromarray(overlay(rgb, load_mask(mask))).save(output)
