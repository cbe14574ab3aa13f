"""Mask codecs: packbits (the source service's wire format), PNG and COCO RLE.

packbits, pinned down byte for byte (tests/test_codecs.py):
    one mask  = big-endian uint16 H, W, row_stride, then H rows of `numpy.packbits`
                along the row, most significant bit = leftmost pixel, 1 = foreground,
                row_stride = ceil(W / 8)
    a batch   = each mask prefixed by its 4-byte big-endian length
All work is numpy/zlib/pycocotools: no per-pixel Python loops.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

FORMATS = ("packbits", "png", "rle")
CONTENT_TYPES = {"packbits": "application/octet-stream", "png": "image/png", "rle": "application/json"}
EXTENSIONS = {"packbits": "packbits", "png": "png", "rle": "rle.json"}
_HDR = struct.Struct(">HHH")
_LEN = struct.Struct(">I")


def _as_bool(mask: np.ndarray) -> np.ndarray:
    if mask.ndim != 2:
        raise ValueError(f"a mask is 2-D, got shape {mask.shape}")
    return mask if mask.dtype == np.bool_ else mask != 0


def encode_packbits(mask: np.ndarray) -> bytes:
    m = _as_bool(mask)
    h, w = m.shape
    if h > 0xFFFF or w > 0xFFFF:
        raise ValueError("packbits carries uint16 sizes: a mask side must be < 65536")
    packed = np.packbits(m, axis=1, bitorder="big")
    return _HDR.pack(h, w, (w + 7) // 8) + packed.tobytes()


def decode_packbits(buf: bytes | memoryview) -> np.ndarray:
    h, w, stride = _HDR.unpack_from(buf, 0)
    if stride != (w + 7) // 8:
        raise ValueError(f"row_stride {stride} does not match width {w}")
    need = _HDR.size + h * stride
    if len(buf) != need:
        raise ValueError(f"packbits mask of {h}x{w} needs {need} bytes, got {len(buf)}")
    rows = np.frombuffer(buf, dtype=np.uint8, offset=_HDR.size).reshape(h, stride)
    return np.unpackbits(rows, axis=1, count=w, bitorder="big").astype(bool)


def encode_batch(items: Iterable[bytes]) -> bytes:
    return b"".join(_LEN.pack(len(b)) + b for b in items)


def decode_batch(buf: bytes) -> list[bytes]:
    out, off = [], 0
    while off < len(buf):
        (n,) = _LEN.unpack_from(buf, off)
        off += _LEN.size
        if off + n > len(buf):
            raise ValueError("truncated packbits batch")
        out.append(bytes(buf[off : off + n]))
        off += n
    return out


def encode_png(mask: np.ndarray) -> bytes:
    m = _as_bool(mask)
    bio = io.BytesIO()
    # 8-bit grey, 0 = background, 255 = foreground; level 1: masks compress well anyway
    Image.fromarray(m.view(np.uint8) * np.uint8(255), mode="L").save(bio, format="PNG", compress_level=1)
    return bio.getvalue()


def decode_png(buf: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(buf), formats=["PNG"]) as im:
        return np.asarray(im.convert("L")) >= 128


def encode_rle(mask: np.ndarray) -> dict:
    m = _as_bool(mask)
    rle = coco_mask.encode(np.asfortranarray(m.view(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict) -> np.ndarray:
    r = {"size": list(rle["size"]), "counts": rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]}
    return coco_mask.decode(r).astype(bool)


def encode(mask: np.ndarray, fmt: str) -> bytes:
    """One mask in a storage/wire format (rle as JSON bytes)."""
    if fmt == "packbits":
        return encode_packbits(mask)
    if fmt == "png":
        return encode_png(mask)
    if fmt == "rle":
        import orjson

        return orjson.dumps(encode_rle(mask))
    raise ValueError(f"unknown mask format {fmt!r}; use one of {', '.join(FORMATS)}")


def decode(buf: bytes, fmt: str) -> np.ndarray:
    if fmt == "packbits":
        return decode_packbits(buf)
    if fmt == "png":
        return decode_png(buf)
    if fmt == "rle":
        import orjson

        return decode_rle(orjson.loads(buf))
    raise ValueError(f"unknown mask format {fmt!r}")


def encode_label_map(labels: np.ndarray) -> bytes:
    """A class-index map as an 8- or 16-bit PNG."""
    bio = io.BytesIO()
    arr = labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16)
    Image.fromarray(arr).save(bio, format="PNG", compress_level=1)
    return bio.getvalue()


def shape_of(masks: Sequence[np.ndarray]) -> list[int]:
    return list(masks[0].shape) if masks else []
