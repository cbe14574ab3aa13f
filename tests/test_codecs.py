"""The packbits layout byte for byte, and PNG / COCO RLE round trips."""

import struct

import numpy as np
import pytest

from storage import codecs


def test_packbits_layout_pinned_byte_for_byte() -> None:
    # 3 x 10 mask: row 0 = leftmost pixel on; row 1 = pixels 7 and 8 on; row 2 = all on
    m = np.zeros((3, 10), bool)
    m[0, 0] = True
    m[1, 7] = m[1, 8] = True
    m[2, :] = True
    b = codecs.encode_packbits(m)
    assert b[:6] == struct.pack(">HHH", 3, 10, 2)  # H, W, row_stride = ceil(10/8)
    assert b[6:] == bytes([0b1000_0000, 0, 0b0000_0001, 0b1000_0000, 0xFF, 0b1100_0000])
    assert len(b) == 6 + 3 * 2
    assert (codecs.decode_packbits(b) == m).all()


def test_packbits_batch_is_length_prefixed() -> None:
    a = codecs.encode_packbits(np.ones((2, 3), bool))
    b = codecs.encode_packbits(np.zeros((1, 17), bool))
    buf = codecs.encode_batch([a, b])
    assert buf[:4] == struct.pack(">I", len(a)) and buf[4 : 4 + len(a)] == a
    assert buf[4 + len(a) : 8 + len(a)] == struct.pack(">I", len(b))
    assert codecs.decode_batch(buf) == [a, b]


def test_packbits_rejects_bad_buffers() -> None:
    b = codecs.encode_packbits(np.ones((4, 9), bool))
    with pytest.raises(ValueError):
        codecs.decode_packbits(b[:-1])
    with pytest.raises(ValueError):
        codecs.decode_batch(struct.pack(">I", 99) + b"xx")


@pytest.mark.parametrize("fmt", ["packbits", "png", "rle"])
def test_round_trip_random_masks(fmt: str) -> None:
    rng = np.random.default_rng(0)
    for h, w in [(1, 1), (7, 13), (172, 448), (300, 451)]:
        m = rng.random((h, w)) > 0.6
        assert (codecs.decode(codecs.encode(m, fmt), fmt) == m).all()


def test_png_is_8bit_0_255() -> None:
    from io import BytesIO

    from PIL import Image

    m = np.zeros((5, 6), bool)
    m[1:3, 2:5] = True
    im = Image.open(BytesIO(codecs.encode_png(m)))
    assert im.mode == "L" and im.size == (6, 5)
    a = np.asarray(im)
    assert set(np.unique(a)) == {0, 255} and (a[m] == 255).all()


def test_rle_is_coco_string() -> None:
    m = np.zeros((4, 4), bool)
    m[:, 0] = True  # column-major: first 4 pixels on
    r = codecs.encode_rle(m)
    assert r["size"] == [4, 4] and isinstance(r["counts"], str)
    from pycocotools import mask as cm

    assert cm.area({"size": r["size"], "counts": r["counts"].encode()}) == 4
