"""textmask answers as its reference pipeline, RapidOCR 1.4.4, on the same model file.

The reference is `rapidocr_onnxruntime` itself, in this process (detection only: its
`TextDetector` behind `RapidOCR`'s own resizing, padding, sorting and mapping back); the
service is a live stack reached over HTTP. On real photos and on text rendered with Pillow
(fonts, sizes, colours, backgrounds; grey, RGBA and JPEG files; a flat banner that RapidOCR
pads, an image above its 2000 px limit) both must find the same regions: the same number,
quadrilaterals within 2 px, scores within 0.01, and filled masks with IoU ≥ 0.9.
"""

from __future__ import annotations

import base64
import io
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont, ImageOps
from rapidocr_onnxruntime import RapidOCR

from storage import codecs
from tests.conftest import IMAGES, photo, png_bytes, wait_job

FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/truetype/liberation"))
JPEG_MAGIC = b"\xff\xd8\xff"
DEFAULTS = {"box_thresh": 0.5, "unclip_ratio": 1.6}  # passed on every reference call: RapidOCR keeps one call's kwargs for the next


def font(name: str, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A system TrueType font when this machine has it, else Pillow's own at that size."""
    for d in FONT_DIRS:
        if (d / name).is_file():
            return ImageFont.truetype(str(d / name), size)
    return ImageFont.load_default(size=size)


Line = tuple[tuple[int, int], str, str, int, tuple[int, ...]]  # (xy, text, font file, px, colour)


def draw(im: Image.Image, lines: list[Line]) -> Image.Image:
    d = ImageDraw.Draw(im)
    for xy, text, face, px, colour in lines:
        d.text(xy, text, fill=colour, font=font(face, px))
    return im


def gradient(w: int, h: int) -> Image.Image:
    g = (np.add.outer(np.arange(h) * 255 // max(1, h - 1), np.arange(w) * 255 // max(1, w - 1)) // 2).astype(np.uint8)
    return Image.fromarray(np.stack([g, 255 - g, np.full_like(g, 128)], -1))


def jpeg(im: Image.Image) -> bytes:
    return png_bytes(im.convert("RGB"), "JPEG", quality=92)


def _rgba_label() -> bytes:
    """Black text on a transparent background (RapidOCR: an all-black masked image → white behind)."""
    return png_bytes(
        draw(Image.new("RGBA", (560, 200), (0, 0, 0, 0)), [((20, 40), "Transparent label", "DejaVuSans.ttf", 48, (0, 0, 0, 255)), ((20, 130), "alpha 255 text", "DejaVuSerif.ttf", 28, (0, 0, 0, 255))])
    )


def _rgba_sticker() -> bytes:
    """Coloured opaque card on transparency (RapidOCR inverts such an image; both sides must)."""
    im = Image.new("RGBA", (600, 260), (0, 0, 0, 0))
    ImageDraw.Draw(im).rounded_rectangle((10, 10, 590, 250), 30, fill=(200, 30, 60, 255))
    return png_bytes(draw(im, [((40, 60), "SALE -50%", "LiberationSans-Bold.ttf", 80, (255, 255, 255, 255)), ((44, 180), "this weekend only", "DejaVuSans.ttf", 30, (255, 240, 200, 255))]))


CASES: dict[str, Callable[[], bytes]] = {
    # real photos: writing on a grey PNG, no text at all, a cat, a rocket (JPEG)
    "text.png": lambda: (IMAGES / "text.png").read_bytes(),
    "coffee.png": lambda: (IMAGES / "coffee.png").read_bytes(),
    "chelsea.png": lambda: (IMAGES / "chelsea.png").read_bytes(),
    "rocket.jpg": lambda: (IMAGES / "rocket.jpg").read_bytes(),
    # rendered text: fonts, sizes, colours, backgrounds
    "invoice": lambda: png_bytes(
        draw(
            Image.new("RGB", (640, 360), "white"),
            [
                ((30, 30), "Invoice 2024-07", "DejaVuSans.ttf", 44, (0, 0, 0)),
                ((30, 120), "Total due: 1,234.56 EUR", "DejaVuSerif.ttf", 26, (40, 40, 40)),
                ((30, 250), "thank you", "LiberationMono-Regular.ttf", 18, (0, 0, 0)),
            ],
        )
    ),
    "sign": lambda: png_bytes(
        draw(
            Image.new("RGB", (720, 300), (10, 20, 90)),
            [((40, 60), "OPEN 24 HOURS", "LiberationSerif-Bold.ttf", 72, (250, 220, 40)), ((60, 200), "Back soon", "DejaVuSans-Bold.ttf", 36, (255, 255, 255))],
        )
    ),
    "gradient-mono": lambda: png_bytes(draw(gradient(500, 260), [((12, 14 + 30 * i), f"line {i}: the quick brown fox", "DejaVuSansMono.ttf", 16 + i, (0, 0, 0)) for i in range(8)])),
    "astronaut-captions.jpg": lambda: jpeg(
        draw(photo("astronaut.png"), [((20, 20), "APOLLO", "DejaVuSans-Bold.ttf", 56, (255, 255, 255)), ((20, 450), "Eileen Collins 1992", "DejaVuSerif.ttf", 30, (255, 40, 40))])
    ),
    "grey-L.png": lambda: png_bytes(
        draw(Image.new("L", (480, 220), 235), [((20, 30), "Grey scale page", "LiberationSerif-Regular.ttf", 40, 20), ((20, 120), "second line, smaller", "DejaVuSans.ttf", 24, 60)])
    ),
    "rgba-label.png": _rgba_label,
    "rgba-sticker.png": _rgba_sticker,
    # RapidOCR pads a flat image (w/h > 8) with black above and below, and scales one above 2000 px down
    "banner": lambda: png_bytes(draw(Image.new("RGB", (1000, 90), (245, 245, 220)), [((20, 20), "A long thin banner with a single line of words", "DejaVuSans.ttf", 40, (20, 20, 120))])),
    "big-2400": lambda: png_bytes(
        draw(
            Image.new("RGB", (2400, 900), "white"),
            [((80, 100), "Large poster headline", "DejaVuSans-Bold.ttf", 150, (0, 0, 0)), ((90, 500), "and its much smaller subtitle line", "DejaVuSerif.ttf", 70, (90, 0, 0))],
        )
    ),
}


@pytest.fixture(scope="module")
def stack(make_stack):
    return make_stack(models=["textmask"], env={"MAX_BATCH_SIZE": "4", "BATCH_TIMEOUT_MS": "20"})


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> RapidOCR:
    return RapidOCR(det_model_path=str(model_dir / "textmask" / "textmask.onnx"))


def filled(quads: list, hw: tuple[int, int]) -> np.ndarray:
    """The rule the service follows, written out here: each quadrilateral rounded to whole pixels, filled with cv2.fillPoly."""
    m = np.zeros(hw, np.uint8)
    for q in quads:
        cv2.fillPoly(m, [np.round(np.asarray(q, np.float32)).astype(np.int32)], 1)
    return m.astype(bool)


def reference(eng: RapidOCR, data: bytes, **kw: Any) -> tuple[list[np.ndarray], list[float], np.ndarray]:
    """RapidOCR's quadrilaterals (its order), their scores, and the filled mask at the original size.

    `RapidOCR.__call__` returns boxes only; the scores are DBPostProcess's, on the same input
    (its own steps, called one by one), matched to the boxes it returned."""
    kw = {**DEFAULTS, **kw}
    res, _ = eng(data, use_det=True, use_cls=False, use_rec=False, **kw)
    boxes = [np.asarray(b, np.float32) for b in res or []]
    img = eng.load_img(data)
    raw_h, raw_w = img.shape[:2]
    op: dict[str, Any] = {}
    img, rh, rw = eng.preprocess(img)
    op["preprocess"] = {"ratio_h": rh, "ratio_w": rw}
    img, op = eng.maybe_add_letterbox(img, op)
    det = eng.text_det
    x = det.get_preprocess(max(img.shape[0], img.shape[1]))(img)
    cand, cand_scores = det.postprocess_op(det.infer(x)[0], img.shape[:2])
    mapped = []
    for b, s in zip(cand, cand_scores, strict=True):
        kept = det.filter_tag_det_res(np.array([b]), img.shape[:2])
        if len(kept):
            mapped.append((eng._get_origin_points(list(kept), op, raw_h, raw_w)[0], s))
    scores = [min(mapped, key=lambda m: float(np.abs(m[0] - b).max()))[1] for b in boxes]
    return boxes, scores, filled(boxes, (raw_h, raw_w))


def assert_same(name: str, body: dict[str, Any], ref: tuple[list[np.ndarray], list[float], np.ndarray], coffee_slack: bool = False) -> None:
    boxes, scores, ref_mask = ref
    mask = codecs.decode_rle(body)
    regions = body["regions"]
    assert mask.shape == ref_mask.shape, name
    assert len(regions) == len(boxes), (name, len(regions), len(boxes))
    for r, b, s in zip(regions, boxes, scores, strict=True):
        q = np.asarray(r["points"], np.float32)
        assert q.shape == (4, 2) and float(np.abs(q - b).max()) <= 2.0, (name, q.tolist(), b.tolist())
        assert abs(r["score"] - s) <= 0.01 and 0.0 <= r["score"] <= 1.0, (name, r["score"], s)
    assert (mask == filled([r["points"] for r in regions], mask.shape)).all(), "the mask is the filled quadrilaterals"
    if boxes:
        iou = (mask & ref_mask).sum() / (mask | ref_mask).sum()
        assert iou >= 0.9, (name, iou)
    else:
        assert mask.sum() == 0, name
    assert mask.mean() <= ref_mask.mean() + 0.005, (name, mask.mean(), ref_mask.mean())


def post(stack: Any, data: bytes, query: str = "format=rle") -> httpx.Response:
    return httpx.post(f"{stack.url}/run_textmask?{query}", content=data, headers={"Content-Type": "application/octet-stream"}, timeout=120)


@pytest.mark.parametrize("name", list(CASES))
def test_sync_answer_equals_rapidocr(stack: Any, engine: RapidOCR, name: str) -> None:
    data = CASES[name]()
    r = post(stack, data)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json" and r.headers["x-mask-format"] == "rle"
    body = r.json()
    assert set(body) == {"size", "counts", "regions"}
    assert_same(name, body, reference(engine, data))


def test_the_readme_figures_text_and_coffee(stack: Any, engine: RapidOCR) -> None:
    """What RapidOCR 1.4.4 finds on the two README photos, and the service with it."""
    text = post(stack, CASES["text.png"]()).json()
    coffee = post(stack, CASES["coffee.png"]()).json()
    assert len(text["regions"]) == 6 and round(codecs.decode_rle(text).mean() * 100, 1) == 18.5  # both lines of writing
    assert len(coffee["regions"]) == 1 and round(codecs.decode_rle(coffee).mean() * 100, 1) == 1.0  # no text: one small region, as the reference
    top = text["regions"][0]
    assert top["points"][0] == [3.0, 23.0] and top["score"] > 0.5  # RapidOCR's first box starts at (3, 23)


def test_a_tar_batch_of_differently_sized_images(stack: Any, engine: RapidOCR) -> None:
    """Several images of different shapes in one request (one worker batch): each answer is the reference's."""
    names = ["text.png", "sign", "coffee.png", "banner", "invoice"]
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w") as tf:
        for i, n in enumerate(names):
            d = CASES[n]()
            ti = tarfile.TarInfo(f"s{i}.{'jpg' if d.startswith(JPEG_MAGIC) else 'png'}")
            ti.size = len(d)
            tf.addfile(ti, io.BytesIO(d))
    r = httpx.post(stack.url + "/run_textmask?format=rle", content=bio.getvalue(), headers={"Content-Type": "application/x-tar"}, timeout=180)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["keys"] == [f"s{i}" for i in range(len(names))] and body["errors"] == []
    for n, m in zip(names, body["masks"], strict=True):
        assert_same(n, m, reference(engine, CASES[n]()))


def test_job_result_json_and_params_overrides(stack: Any, engine: RapidOCR) -> None:
    data = CASES["invoice"]()
    b64 = base64.b64encode(data).decode()

    def job(params: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(stack.url + "/v1/jobs", json={"model": "textmask", "input": {"image": b64}, "params": params}, timeout=30)
        assert r.status_code == 202, r.text
        return wait_job(stack.url, r.json()["job_id"], timeout=120)

    j = job({"format": "rle"})
    assert j["status"] == "succeeded", j
    meta = j["result"]["meta"]
    assert j["result"]["trained"] is True  # the pretrained PP-OCRv4 det
    rle = httpx.get(stack.url + f"/v1/jobs/{j['job_id']}/result", timeout=10).json()
    assert_same("invoice job", {**rle, "regions": meta["regions"]}, reference(engine, data))
    assert meta["foreground_pixels"] == int(codecs.decode_rle(rle).sum())
    # the reference's knobs, per request: a stricter box score and a tighter unclip, as RapidOCR's own kwargs
    j2 = job({"format": "rle", "box_thresh": 0.8, "unclip_ratio": 1.2})
    assert j2["status"] == "succeeded", j2
    rle2 = httpx.get(stack.url + f"/v1/jobs/{j2['job_id']}/result", timeout=10).json()
    ref2 = reference(engine, data, box_thresh=0.8, unclip_ratio=1.2)
    assert_same("invoice box_thresh=0.8 unclip=1.2", {**rle2, "regions": j2["result"]["meta"]["regions"]}, ref2)
    assert codecs.decode_rle(rle2).sum() < codecs.decode_rle(rle).sum()  # a tighter unclip marks less
    # a bad value fails that job alone with 422, and the service answers the next one
    for bad in ({"box_thresh": 2}, {"max_candidates": 0.5}, {"limit_type": "square"}, {"thresh": "high"}):
        jb = job(bad)
        assert jb["status"] == "failed" and jb["error"]["code"] == "unprocessable" and jb["error"]["status"] == 422, (bad, jb)
        assert next(iter(bad)) in jb["error"]["message"]
    assert post(stack, CASES["coffee.png"]()).status_code == 200


def test_limit_type_max_as_the_reference(stack: Any, model_dir: Path) -> None:
    """limit_type "max": RapidOCR's 960/1500/2000 tiers by the image's long side (limit_side_len unread);
    text.png (448 px wide) then runs at its own size, 160 x 448, and the answer changes with it."""
    eng = RapidOCR(det_model_path=str(model_dir / "textmask" / "textmask.onnx"), det_limit_type="max")
    data = CASES["text.png"]()
    r = httpx.post(
        stack.url + "/v1/jobs", json={"model": "textmask", "input": {"image": base64.b64encode(data).decode()}, "params": {"format": "rle", "limit_type": "max", "limit_side_len": 64}}, timeout=30
    )
    j = wait_job(stack.url, r.json()["job_id"], timeout=120)
    assert j["status"] == "succeeded", j
    rle = httpx.get(stack.url + f"/v1/jobs/{j['job_id']}/result", timeout=10).json()
    regions = j["result"]["meta"]["regions"]
    assert_same("text.png limit_type=max", {**rle, "regions": regions}, reference(eng, data))
    default = post(stack, data).json()["regions"]
    assert regions != default


def test_exif_orientation_is_applied_before_detection(stack: Any, engine: RapidOCR) -> None:
    """Deliberate difference: a JPEG with an EXIF rotation is read upright (as by every model here);
    its answer is RapidOCR's on the upright pixels."""
    upright = draw(Image.new("RGB", (640, 300), "white"), [((30, 40), "Rotated by EXIF", "DejaVuSans.ttf", 48, (0, 0, 0)), ((30, 180), "read upright", "DejaVuSerif.ttf", 36, (0, 0, 90))])
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 = rotate 90° clockwise to display
    exif = Image.Exif()
    exif[0x0112] = 6
    data = png_bytes(stored, "JPEG", quality=95, exif=exif.tobytes())
    with Image.open(io.BytesIO(data)) as im:
        shown_upright = png_bytes(ImageOps.exif_transpose(im).convert("RGB"))
    r = post(stack, data)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["size"] == [300, 640] and len(body["regions"]) >= 2
    assert_same("exif-6", body, reference(engine, shown_upright))


def _modes_page() -> Image.Image:
    return draw(
        Image.new("RGB", (520, 200), (250, 250, 250)),
        [((20, 30), "Image modes", "DejaVuSans-Bold.ttf", 52, (10, 10, 10)), ((20, 120), "palette, 1-bit, grey+alpha", "DejaVuSerif.ttf", 28, (30, 30, 140))],
    )


@pytest.mark.parametrize(
    ("mode", "as_reference_reads_it"),
    [
        ("LA", True),  # grey + alpha: RapidOCR's own rule (onto white), replicated
        ("1", True),  # 1-bit: RapidOCR converts it to grey, so does the service
        ("P", False),  # palette: RapidOCR would feed the palette indices as grey; the service reads the colours
    ],
)
def test_image_modes(stack: Any, engine: RapidOCR, mode: str, as_reference_reads_it: bool) -> None:
    page = _modes_page()
    if mode == "LA":
        im = page.convert("LA")
        im.putalpha(Image.linear_gradient("L").resize(page.size).point(lambda v: 255 - v // 2))  # alpha 255 → 128 down the page
    else:
        im = page.convert(mode)
    data = png_bytes(im)
    ref_input = data if as_reference_reads_it else png_bytes(im.convert("RGB"))  # the deliberate difference: what the service reads
    r = post(stack, data)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["regions"]) >= 2, (mode, body["regions"])
    assert_same(f"mode {mode}", body, reference(engine, ref_input))
