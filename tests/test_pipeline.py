"""End to end through real processes: API → Redis → textmask worker (real PP-OCRv4) → storage."""

from __future__ import annotations

import struct

import httpx
import pytest

from storage import codecs
from tests.conftest import with_text


@pytest.fixture(scope="module")
def stack(make_stack):
    return make_stack(models=["textmask"])


def test_textmask_png_mask_lies_on_the_text(stack) -> None:
    data, gt = with_text("chelsea.png")
    r = httpx.post(stack.url + "/run_textmask?format=png", content=data, headers={"Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.headers["x-mask-format"] == "png"
    mask = codecs.decode_png(r.content)
    assert mask.shape == gt.shape == (300, 451)
    on = mask.sum()
    assert on > 10_000, "the text must be found"  # 13,443 px: the two filled text boxes
    assert mask[gt].sum() / on > 0.99, "the mask must lie on the text"
    assert mask[gt].mean() > 0.7, "most of each text box is covered"  # 0.745: RapidOCR's boxes hug the letters
    # the same image as RLE: the two lines as two quadrilaterals, top to bottom, filling that mask
    body = httpx.post(stack.url + "/run_textmask?format=rle", content=data, headers={"Content-Type": "image/png"}, timeout=60).json()
    assert (codecs.decode_rle(body) == mask).all() and len(body["regions"]) == 2
    (x0, y0), (x1, y1) = body["regions"][0]["points"][0], body["regions"][1]["points"][0]
    assert x0 < 40 and y0 < 40 and x1 < 60 and y1 > 220  # "HELLO WORLD 42" drawn at (20, 20), "Trifecta cat" at (40, 230)
    assert all(0.5 <= r["score"] <= 1.0 for r in body["regions"])


def test_default_packbits_matches_png_and_headers(stack) -> None:
    data, gt = with_text("coffee.png")
    r = httpx.post(stack.url + "/run_textmask", content=data, headers={"Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 200
    assert r.headers["x-mask-format"] == "packbits" and r.headers["x-batch-size"] == "1"
    h, w, stride = struct.unpack(">HHH", r.content[:6])
    assert (h, w, stride) == (400, 600, 75) and len(r.content) == 6 + 400 * 75
    m = codecs.decode_packbits(r.content)
    r2 = httpx.post(stack.url + "/run_textmask?format=png", content=data, headers={"Content-Type": "image/png"}, timeout=60)
    assert (codecs.decode_png(r2.content) == m).all()
    assert m[gt].sum() / max(1, m.sum()) > 0.95 and m.sum() > 10_000  # 0.978 of 16,632 px on the drawn text
