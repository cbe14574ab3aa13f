"""The workers' image decode fast path (simplejpeg) and the ONNX runner's preprocessing,
checked pixel for pixel against Pillow and the plain numpy formula on real photos."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from tasks.errors import UndecodableImage
from tasks.images import decode_fitted, decode_rgb, original_size
from tasks.settings import Settings
from workers.device import Device
from workers.runners.base import Item
from workers.runners.onnxseg import OnnxSegRunner
from workers.runners.textdet import TextDetRunner

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "tests" / "data" / "images" / "chelsea.png"


def _jpeg(im: Image.Image, **kw: object) -> bytes:
    b = io.BytesIO()
    im.save(b, "JPEG", quality=92, **kw)
    return b.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow_exactly(orientation: int) -> None:
    ex = Image.Exif()
    ex[0x0112] = orientation
    data = _jpeg(Image.open(PHOTO).convert("RGB"), exif=ex.tobytes())
    ref = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    got = decode_rgb(data, 1 << 30)
    assert got.shape == ref.shape and got.dtype == np.uint8 and got.flags.c_contiguous
    assert np.array_equal(got, ref)  # same libjpeg-turbo, same IDCT: identical pixels
    assert original_size(data, 1 << 30) == ref.shape[:2]
    # one header read for both: the oriented full size, and a DCT-scaled decode fitted to what the caller asks
    seen = []
    small, size = decode_fitted(data, 1 << 30, lambda h, w: seen.append((h, w)) or (h // 4, w // 4))
    assert size == ref.shape[:2] and seen == [ref.shape[:2]]
    assert small.shape[0] >= ref.shape[0] // 4 and small.shape[1] >= ref.shape[1] // 4 and small.shape[0] < ref.shape[0]


@pytest.mark.parametrize("orientation", [1, 6])
def test_png_size_comes_from_its_decode_with_its_exif_orientation(orientation: int) -> None:
    ex = Image.Exif()
    ex[0x0112] = orientation
    bio = io.BytesIO()
    Image.open(PHOTO).convert("RGB").save(bio, format="PNG", exif=ex.tobytes())
    ref = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(bio.getvalue()))).convert("RGB"))
    got, size = decode_fitted(bio.getvalue(), 1 << 30, lambda h, w: (1, 1))
    assert size == ref.shape[:2] == got.shape[:2] and np.array_equal(got, ref)


def test_grey_jpeg_comes_out_as_three_equal_channels() -> None:
    grey = Image.open(PHOTO).convert("L")
    got = decode_rgb(_jpeg(grey), 1 << 30)
    ref = np.asarray(Image.open(io.BytesIO(_jpeg(grey))).convert("L"))
    assert got.shape == (*ref.shape, 3)
    assert np.array_equal(got[..., 0], ref) and np.array_equal(got[..., 1], ref) and np.array_equal(got[..., 2], ref)


def test_cmyk_jpeg_still_decodes_through_pillow() -> None:
    cmyk = Image.open(PHOTO).convert("CMYK")
    got = decode_rgb(_jpeg(cmyk), 1 << 30)
    assert got.shape == (300, 451, 3) and got.dtype == np.uint8
    assert abs(float(got.mean()) - float(np.asarray(Image.open(PHOTO).convert("RGB")).mean())) < 20


def test_scaled_decode_keeps_at_least_the_asked_size() -> None:
    big = Image.open(PHOTO).convert("RGB").resize((1804, 1200))
    data = _jpeg(big)
    for mh, mw in ((1200, 1804), (600, 902), (300, 400), (150, 226), (10, 10)):
        a = decode_rgb(data, 1 << 30, min_size=(mh, mw))
        assert a.shape[0] >= mh and a.shape[1] >= mw
        # the largest libjpeg scale factor (1/2, 1/4, 1/8) that still fits: never more than 2x what was asked
        assert a.shape[0] < 2 * max(mh, 150) + 2
    assert decode_rgb(data, 1 << 30, min_size=(10, 10)).shape == (150, 226, 3)  # 1/8 is the smallest scale


def test_truncated_jpeg_is_a_clear_422() -> None:
    data = _jpeg(Image.open(PHOTO).convert("RGB"))
    with pytest.raises(UndecodableImage) as e:
        decode_rgb(data[: len(data) // 2], 1 << 30)
    assert e.value.status == 422 and "truncated or corrupt" in e.value.message


# The letterbox path of the generic ONNX runner, on a real model: PP-OCRv4 det (from the textmask
# files) under the sigmoid/letterbox config it was once served with. (textmask itself now runs
# as RapidOCR does: tests/test_textmask_parity.py and the textdet tests below.)
LETTERBOX_CONFIG = {"input_size": 640, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "input_name": "x", "output_name": "sigmoid_0.tmp_0", "head": "sigmoid", "threshold": 0.3, "channel_order": "BGR", "multiple_of": 32, "resize": "letterbox"}


@pytest.fixture(scope="module")
def textmask(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> OnnxSegRunner:
    d = tmp_path_factory.mktemp("letterbox") / "textmask"
    d.mkdir()
    (d / "textmask.onnx").symlink_to(model_dir / "textmask" / "textmask.onnx")
    (d / "textmask_config.json").write_text(json.dumps(LETTERBOX_CONFIG))
    r = OnnxSegRunner("textmask", Settings(model_dir=str(d.parent), input_size=640), Device("cpu", 0, None, 2))
    r.load()
    return r


def _reference(r: OnnxSegRunner, rgb: np.ndarray, content: tuple[int, int]) -> np.ndarray:
    """The textbook formula: resize, BGR, (x/255 - 0.5)/0.5, CHW, zero padding."""
    ch, cw = content
    u = np.asarray(Image.fromarray(rgb).resize((cw, ch), Image.BILINEAR)).astype(np.float32) if rgb.shape[:2] != content else rgb.astype(np.float32)
    out = np.zeros((3, r.input_size, r.input_size), np.float32)
    out[:, :ch, :cw] = ((u[..., ::-1] / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    return out


def test_prepare_letterboxes_a_big_jpeg_from_a_scaled_decode(textmask: OnnxSegRunner) -> None:
    big = Image.open(PHOTO).convert("RGB").resize((2706, 1800))
    data = _jpeg(big)
    x, content, size = textmask.prepare(Item(req=None, data=data))  # type: ignore[arg-type]
    assert size == (1800, 2706) and content == (426, 640) and x.shape == (3, 640, 640) and x.dtype == np.float32
    assert np.all(x[:, 426:, :] == 0.0)  # letterbox padding = the mean colour
    full = decode_rgb(data, 1 << 30)
    ref = _reference(textmask, full, content)
    assert float(np.abs(x - ref).mean()) < 0.02  # a DCT-scaled decode then bilinear, against full decode then bilinear
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_threaded_normalisation_equals_the_formula(textmask: OnnxSegRunner) -> None:
    rgb = np.asarray(Image.open(PHOTO).convert("RGB").resize((640, 640)))
    big = np.ascontiguousarray(np.tile(rgb, (2, 2, 1)))  # 1280 x 1280: above the split threshold, 2 threads
    r = OnnxSegRunner("textmask", Settings(model_dir=textmask.settings.model_dir, input_size=1280), Device("cpu", 0, None, 2))
    r.cfg, r.input_size, r._scale_c, r._offset_c = textmask.cfg, 1280, textmask._scale_c, textmask._offset_c
    x, content = r.preprocess(big)
    assert content == (1280, 1280)
    assert np.allclose(x, _reference(r, big, content), atol=1e-6)


def test_enlarging_through_opencv_stays_within_a_grey_level_of_pillow() -> None:
    from workers.runners.onnxseg import resize_rgb

    rgb = np.asarray(Image.open(PHOTO).convert("RGB"))
    got = resize_rgb(rgb, 640, 640)
    ref = np.asarray(Image.fromarray(rgb).resize((640, 640), Image.BILINEAR))
    assert got.shape == ref.shape == (640, 640, 3) and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.5
    small = resize_rgb(rgb, 150, 200)  # shrinking: Pillow's antialiased bilinear, exactly
    assert np.array_equal(small, np.asarray(Image.fromarray(rgb).resize((200, 150), Image.BILINEAR)))


@pytest.fixture(scope="module")
def textdet(model_dir: Path) -> TextDetRunner:
    r = TextDetRunner("textmask", Settings(model_dir=str(model_dir)), Device("cpu", 0, None, 2))
    r.load()
    return r


@pytest.mark.parametrize("size", [(2706, 1800), (451, 300), (1000, 90), (40, 20)])
def test_textdet_input_is_rapidocrs_bit_for_bit(textdet: TextDetRunner, size: tuple[int, int]) -> None:
    """The tensor the model gets equals the one RapidOCR 1.4.4 builds from the same JPEG bytes:
    its scaling down past 2000 px, up to 30 px and to 736, its black padding of flat images,
    cv2's resize, BGR, (x/255 - 0.5)/0.5."""
    from rapidocr_onnxruntime import RapidOCR

    eng = RapidOCR(det_model_path=str(Path(textdet.settings.model_dir) / "textmask" / "textmask.onnx"))
    data = _jpeg(Image.open(PHOTO).convert("RGB").resize(size))
    img = eng.load_img(data)
    img, *_ = eng.preprocess(img)
    img, op = eng.maybe_add_letterbox(img, {})
    ref = eng.text_det.get_preprocess(max(img.shape[:2]))(img)[0]
    p = textdet.prepare(Item(req=None, data=data))  # type: ignore[arg-type]
    assert p.x.dtype == np.float32 and p.x.shape == ref.shape and p.x.shape[1] % 32 == 0 and p.x.shape[2] % 32 == 0
    assert np.array_equal(p.x, ref)
    assert p.raw_hw == (size[1], size[0]) and p.pad_top == op["padding_1"]["top"]
