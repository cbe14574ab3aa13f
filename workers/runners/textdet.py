"""`textmask`: PP-OCRv4 text detection, run as its reference pipeline RapidOCR 1.4.4 runs it.

The model (`ch_PP-OCRv4_det_infer.onnx` from the `rapidocr_onnxruntime` wheel) outputs a
probability map of *shrunk* text kernels; it is not a mask. RapidOCR turns it into text
regions with DB post-processing, and so does this runner, step for step:

    decode        the bytes as RapidOCR's LoadImage feeds them: BGR, grey → 3 channels,
                  grey+alpha onto white, RGBA through its own alpha rule (see `to_bgr`)
    RapidOCR      long side > 2000 → scaled down (multiples of 32); short side < 30 → up;
                  very flat images (h ≤ 30 or w/h > 8) padded top and bottom with black
    TextDetector  limit_type "min": short side < 736 → enlarged to 736, both sides rounded
                  to multiples of 32, cv2.resize (bilinear); (x/255 - 0.5)/0.5, CHW
    model         one map per image, its size = the input's
    DBPostProcess map > 0.3, 2x2 dilation, contours (at most 1000), min-area box of each,
                  mean probability inside ≥ 0.5, unclip by area*1.6/perimeter (pyclipper),
                  min-area box again, scaled to the detector's image
    TextDetector  points ordered clockwise from top-left, clipped, boxes ≤ 3 px dropped
    RapidOCR      sorted top-to-bottom, left-to-right; padding and scaling undone

The answer: the quadrilaterals (4 points each, RapidOCR's order) with their scores in
`meta["regions"]`, and a mask at the original image size made of the filled quadrilaterals.
Post-processing parameters come from TEXTMASK_* settings (RapidOCR's values by default) and
may be overridden per request through `params`.

rapidocr itself is never imported here (it is a test dependency: tests/test_textmask_parity.py
runs it in-process on the same model file and compares): its det code is small, Apache-2.0,
and tied to its own config loader, logger and onnxruntime session, so the steps above are
ported (`DBPostProcess` as `db_boxes`), with cv2, pyclipper and shapely as it uses them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import ImageOps

from tasks.errors import UndecodableImage, Unprocessable, shown
from tasks.images import decode_opened, open_image, to_rgb
from workers import devprep
from workers.modelfiles import is_trained
from workers.onnxrun import OrtModel
from workers.runners.base import Item, Produced, Runner
from workers.runners.onnxseg import _opencv, locate_files

log = logging.getLogger("trifecta.textdet")

# RapidOCR 1.4.4's fixed values (config.yaml `Global`, DBPostProcess)
MIN_SIDE_LEN = 30
MIN_HEIGHT = 30
WIDTH_HEIGHT_RATIO = 8
MIN_SIZE = 3
USE_DILATION = True  # score_mode "fast" (box_score_fast) is the only one served


@dataclass(frozen=True)
class DetParams:
    """The knobs of one detection; defaults from settings, `params` of a request override them."""

    limit_side_len: int = 736
    limit_type: str = "min"
    max_side_len: int = 2000
    thresh: float = 0.3
    box_thresh: float = 0.5
    unclip_ratio: float = 1.6
    max_candidates: int = 1000

    @classmethod
    def from_settings(cls, s: Any) -> DetParams:
        return cls(s.textmask_limit_side_len, s.textmask_limit_type, s.textmask_max_side_len, s.textmask_thresh, s.textmask_box_thresh, s.textmask_unclip_ratio, s.textmask_max_candidates)

    def with_overrides(self, params: dict[str, Any] | None) -> DetParams:
        """Request `params` over the defaults (unknown keys are left to other consumers); a bad value is a 422."""
        if not params:
            return self
        kw: dict[str, Any] = {}
        for key, (kind, lo, hi) in _PARAM_RANGES.items():
            if key not in params:
                continue
            v = params[key]
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or float(v).is_integer())
            if not ok or not (lo <= v <= hi) or (key == "thresh" and not 0 < v < 1):
                raise Unprocessable(f"params.{key} must be {'an integer' if kind is int else 'a number'} in [{lo}, {hi}]{' (exclusive)' if key == 'thresh' else ''}, got {shown(v)}")
            kw[key] = kind(v)
        if "limit_type" in params:
            if params["limit_type"] not in ("min", "max"):
                raise Unprocessable(f"params.limit_type must be 'min' or 'max', got {shown(params['limit_type'])}")
            kw["limit_type"] = params["limit_type"]
        return DetParams(**{**self.__dict__, **kw}) if kw else self


_PARAM_RANGES: dict[str, tuple[type, float, float]] = {
    "limit_side_len": (int, 32, 4096),
    "max_side_len": (int, 32, 8192),
    "thresh": (float, 0.0, 1.0),
    "box_thresh": (float, 0.0, 1.0),
    "unclip_ratio": (float, 1e-6, 10.0),
    "max_candidates": (int, 1, 100_000),
}


@dataclass
class Prepared:
    """One image ready for the model, and what it takes to map boxes back."""

    x: np.ndarray  # 3 x H x W float32, H and W multiples of 32; with ORT_DEVICE_PREPROCESS the h x w x 3 uint8 image, resized on the device to `size`
    det_hw: tuple[int, int]  # size of the image TextDetector was given (after RapidOCR's scaling and padding)
    raw_hw: tuple[int, int]  # the original image's size
    ratio_hw: tuple[float, float]  # RapidOCR's preprocess ratios: original / scaled
    pad_top: int  # RapidOCR's black padding of flat images
    params: DetParams = field(default_factory=DetParams)
    size: tuple[int, int] | None = None  # ORT_DEVICE_PREPROCESS: the model's input size (th, tw) the device resizes to


# ---------------------------------------------------------------- decode (RapidOCR's LoadImage)
def decode_bgr(data: bytes, max_pixels: int) -> np.ndarray:
    """H x W x 3 uint8 BGR, what RapidOCR's `LoadImage` makes of the same bytes.

    Differences, on purpose: EXIF orientation is applied (as every other model here does;
    RapidOCR reads the stored pixels), and modes RapidOCR turns into nonsense arrays are
    converted first: palette images to RGB(A) (RapidOCR would feed palette indices as grey),
    CMYK and 16-bit/float images to RGB as `decode_rgb` does."""
    im = open_image(data, max_pixels)
    if im.format == "JPEG" and im.mode in ("RGB", "L"):
        return decode_opened(im, data, order="BGR")[0]  # libjpeg-turbo straight to BGR numpy, full size, from this one open
    try:
        im.seek(0)
        im.load()
        im = ImageOps.exif_transpose(im) or im
        if im.mode == "1":
            im = im.convert("L")
        elif im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif im.mode == "PA":
            im = im.convert("RGBA")
        if im.mode in ("L", "LA", "RGB", "RGBA"):
            return to_bgr(np.asarray(im))
        return np.ascontiguousarray(to_rgb(im)[..., ::-1])
    except Exception as e:  # as tasks.images.decode_fitted: a body that breaks while decoding is a 422
        raise UndecodableImage(f"the image could not be decoded (truncated or corrupt?): {e}") from None


def to_bgr(a: np.ndarray) -> np.ndarray:
    """RapidOCR's `LoadImage.convert_img` for arrays decoded from bytes (L, LA, RGB, RGBA)."""
    cv2 = _opencv()
    if a.ndim == 2:
        return cv2.cvtColor(a, cv2.COLOR_GRAY2BGR)
    if a.shape[2] == 3:
        return cv2.cvtColor(a, cv2.COLOR_RGB2BGR)
    if a.shape[2] == 2:  # grey + alpha: transparent parts onto white
        g, alpha = a[..., 0], a[..., 1]
        bgr = cv2.cvtColor(np.ascontiguousarray(g), cv2.COLOR_GRAY2BGR)
        not_a = cv2.cvtColor(cv2.bitwise_not(np.ascontiguousarray(alpha)), cv2.COLOR_GRAY2BGR)
        return cv2.add(cv2.bitwise_and(bgr, bgr, mask=np.ascontiguousarray(alpha)), not_a)
    # RGBA, RapidOCR's rule kept as it is (the reference's answers depend on it): pixels with any
    # alpha keep their colour, fully transparent ones go black; an image left all black gets
    # white where transparent, any other is INVERTED (255 - x, transparent parts white)
    r, g, b, alpha = cv2.split(np.ascontiguousarray(a))
    bgr = cv2.merge((b, g, r))
    not_a = cv2.cvtColor(cv2.bitwise_not(alpha), cv2.COLOR_GRAY2BGR)
    bgr = cv2.bitwise_and(bgr, bgr, mask=alpha)
    return cv2.add(bgr, not_a) if np.mean(bgr) <= 0.0 else cv2.bitwise_not(bgr)


# ---------------------------------------------------------------- sizes (RapidOCR.preprocess, TextDetector)
def _round32(h: int, w: int, ratio: float) -> tuple[int, int]:
    return int(round(int(h * ratio) / 32) * 32), int(round(int(w * ratio) / 32) * 32)


def fit_sides(img: np.ndarray, max_side_len: int) -> tuple[np.ndarray, float, float]:
    """RapidOCR.preprocess: long side above `max_side_len` scaled down (reduce_max_side), then
    short side below 30 scaled up (increase_min_side), each to multiples of 32.
    Returns (image, original/scaled height ratio, width ratio)."""
    cv2 = _opencv()
    h0, w0 = img.shape[:2]
    steps = (
        (lambda h, w: max(h, w) > max_side_len, lambda h, w: float(max_side_len) / (h if h > w else w)),
        (lambda h, w: min(h, w) < MIN_SIDE_LEN, lambda h, w: float(MIN_SIDE_LEN) / (h if h < w else w)),
    )
    for needed, ratio in steps:
        h, w = img.shape[:2]
        if needed(h, w):
            rh, rw = _round32(h, w, ratio(h, w))
            if rh <= 0 or rw <= 0:
                raise Unprocessable(f"the image ({w0}x{h0}) is too thin to detect text in")
            img = cv2.resize(img, (rw, rh))
    h, w = img.shape[:2]
    # RapidOCR keeps only the last step's ratio; composing them (original over final) maps
    # boxes back right when both steps ran (a very long, very thin image)
    return img, h0 / h, w0 / w


def pad_flat(img: np.ndarray) -> tuple[np.ndarray, int]:
    """RapidOCR.maybe_add_letterbox: h ≤ 30 or w/h > 8 → black rows above and below."""
    h, w = img.shape[:2]
    if h <= MIN_HEIGHT or w / h > WIDTH_HEIGHT_RATIO:
        pad = int(abs(max(int(w / WIDTH_HEIGHT_RATIO), MIN_HEIGHT) * 2 - h) / 2)
        return _opencv().copyMakeBorder(img, pad, pad, 0, 0, _opencv().BORDER_CONSTANT, value=(0, 0, 0)), pad
    return img, 0


def det_size(h: int, w: int, limit_side_len: int, limit_type: str) -> tuple[int, int]:
    """The model's input size for an h x w image: TextDetector.get_preprocess + DetPreProcess.resize."""
    if limit_type == "max":
        m = max(h, w)
        limit = 960 if m < 960 else 1500 if m < 1500 else 2000  # RapidOCR's tiers; limit_side_len is not read
        ratio = float(limit) / max(h, w) if max(h, w) > limit else 1.0
    else:
        ratio = float(limit_side_len) / min(h, w) if min(h, w) < limit_side_len else 1.0
    return _round32(h, w, ratio)


def normalise_lut(mean: list[np.float32], std: list[np.float32]) -> np.ndarray:
    """3 x 256 float32: channel c's normalised value of each uint8 level, computed as the
    per-pixel arithmetic did it, (x * (1/255) - mean) / std in float32 (bit for bit
    DetPreProcess's values for mean = std = 0.5). A uint8 pixel has 256 possible values, so
    the tensor is one lookup per pixel (OpenCV's LUT into each CHW plane): half the CPU of
    the three float passes per channel it replaces (0.6 vs 1.3 ms at 736x736, 6.2 vs 11.9 ms
    at 1504x1984 on this 2-core VM) and the same bits."""
    levels = np.arange(256, dtype=np.uint8)
    lut = np.empty((3, 256), np.float32)
    for c in range(3):
        np.multiply(levels, np.float32(1 / 255.0), out=lut[c], casting="unsafe")
        lut[c] -= mean[c]
        lut[c] /= std[c]
    return lut


# ---------------------------------------------------------------- DB post-processing (DBPostProcess)
def db_boxes(pred: np.ndarray, dest_hw: tuple[int, int], p: DetParams) -> tuple[list[np.ndarray], list[float]]:
    """Boxes (4 x 2 int32, in the `dest_hw` image) and scores from one H x W probability map."""
    cv2 = _opencv()
    bitmap = (pred > p.thresh).astype(np.uint8)
    if USE_DILATION:
        bitmap = cv2.dilate(bitmap, np.array([[1, 1], [1, 1]], np.uint8))
    height, width = bitmap.shape
    dest_h, dest_w = dest_hw
    contours, _ = cv2.findContours(bitmap * 255, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    boxes: list[np.ndarray] = []
    scores: list[float] = []
    for contour in contours[: p.max_candidates]:
        points, sside = _mini_box(contour)
        if sside < MIN_SIZE:
            continue
        score = _box_score_fast(pred, points.reshape(-1, 2))
        if p.box_thresh > score:
            continue
        expanded = _unclip(points, p.unclip_ratio)
        if not len(expanded):
            continue
        box, sside = _mini_box(expanded)
        if sside < MIN_SIZE + 2:
            continue
        box[:, 0] = np.clip(np.round(box[:, 0] / width * dest_w), 0, dest_w)
        box[:, 1] = np.clip(np.round(box[:, 1] / height * dest_h), 0, dest_h)
        boxes.append(box.astype(np.int32))
        scores.append(score)
    return boxes, scores


def _mini_box(contour: np.ndarray) -> tuple[np.ndarray, float]:
    cv2 = _opencv()
    rect = cv2.minAreaRect(contour)
    pts = sorted(list(cv2.boxPoints(rect)), key=lambda x: x[0])
    i1, i4 = (0, 1) if pts[1][1] > pts[0][1] else (1, 0)
    i2, i3 = (2, 3) if pts[3][1] > pts[2][1] else (3, 2)
    return np.array([pts[i1], pts[i2], pts[i3], pts[i4]]), min(rect[1])


def _box_score_fast(bitmap: np.ndarray, _box: np.ndarray) -> float:
    cv2 = _opencv()
    h, w = bitmap.shape[:2]
    box = _box.copy()
    xmin = np.clip(np.floor(box[:, 0].min()).astype(np.int32), 0, w - 1)
    xmax = np.clip(np.ceil(box[:, 0].max()).astype(np.int32), 0, w - 1)
    ymin = np.clip(np.floor(box[:, 1].min()).astype(np.int32), 0, h - 1)
    ymax = np.clip(np.ceil(box[:, 1].max()).astype(np.int32), 0, h - 1)
    mask = np.zeros((ymax - ymin + 1, xmax - xmin + 1), dtype=np.uint8)
    box[:, 0] = box[:, 0] - xmin
    box[:, 1] = box[:, 1] - ymin
    cv2.fillPoly(mask, box.reshape(1, -1, 2).astype(np.int32), 1)
    return cv2.mean(bitmap[ymin : ymax + 1, xmin : xmax + 1], mask)[0]


def _unclip(box: np.ndarray, unclip_ratio: float) -> np.ndarray:
    import pyclipper
    from shapely.geometry import Polygon

    poly = Polygon(box)
    distance = poly.area * unclip_ratio / poly.length
    offset = pyclipper.PyclipperOffset()
    offset.AddPath(box, pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
    # RapidOCR: np.array(paths).reshape(-1, 1, 2), all paths' points together; it raises when
    # pyclipper returns paths of unequal lengths, where their points are simply joined here
    paths = offset.Execute(distance)
    return np.concatenate([np.asarray(q) for q in paths]).reshape((-1, 1, 2)) if paths else np.zeros((0, 1, 2))


# ---------------------------------------------------------------- TextDetector / RapidOCR after the model
def _order_clockwise(pts: np.ndarray) -> np.ndarray:
    xs = pts[np.argsort(pts[:, 0]), :]
    left, right = xs[:2, :], xs[2:, :]
    tl, bl = left[np.argsort(left[:, 1]), :]
    tr, br = right[np.argsort(right[:, 1]), :]
    return np.array([tl, tr, br, bl], dtype="float32")


def filter_boxes(boxes: list[np.ndarray], scores: list[float], hw: tuple[int, int]) -> tuple[list[np.ndarray], list[float]]:
    """TextDetector.filter_tag_det_res, keeping each score with its box (RapidOCR's own list of
    scores is not filtered along, so it can be out of step; its boxes are what it returns)."""
    h, w = hw
    out_b, out_s = [], []
    for box, score in zip(boxes, scores, strict=True):
        box = _order_clockwise(box)
        box[:, 0] = np.clip(box[:, 0], 0, w - 1).astype(np.int32)  # TextDetector: int(min(max(x, 0), w - 1))
        box[:, 1] = np.clip(box[:, 1], 0, h - 1).astype(np.int32)
        if int(np.linalg.norm(box[0] - box[1])) <= 3 or int(np.linalg.norm(box[0] - box[3])) <= 3:
            continue
        out_b.append(box)
        out_s.append(score)
    return out_b, out_s


def sorted_order(boxes: list[np.ndarray]) -> list[int]:
    """RapidOCR.sorted_boxes as a permutation: top to bottom, then left to right within 10 px."""
    idx = sorted(range(len(boxes)), key=lambda i: (boxes[i][0][1], boxes[i][0][0]))
    for i in range(len(idx) - 1):
        for j in range(i, -1, -1):
            a, b = boxes[idx[j]], boxes[idx[j + 1]]
            if abs(b[0][1] - a[0][1]) < 10 and b[0][0] < a[0][0]:
                idx[j], idx[j + 1] = idx[j + 1], idx[j]
            else:
                break
    return idx


def to_original(boxes: np.ndarray, p: Prepared) -> np.ndarray:
    """RapidOCR._get_origin_points: padding removed, scaling undone, clipped to [0, size]."""
    b = boxes.astype(np.float32)
    b[:, :, 1] -= p.pad_top
    b[:, :, 0] *= p.ratio_hw[1]
    b[:, :, 1] *= p.ratio_hw[0]
    b = np.where(b < 0, 0, b)
    h, w = p.raw_hw
    b[..., 0] = np.where(b[..., 0] > w, w, b[..., 0])
    b[..., 1] = np.where(b[..., 1] > h, h, b[..., 1])
    return b


def fill_quads(quads: np.ndarray | list, hw: tuple[int, int]) -> np.ndarray:
    """H x W bool mask of the filled quadrilaterals (rounded to whole pixels, each filled on its own)."""
    cv2 = _opencv()
    m = np.zeros(hw, np.uint8)
    for q in quads:
        cv2.fillPoly(m, [np.round(np.asarray(q, np.float32)).astype(np.int32).reshape(-1, 1, 2)], 1)
    return m.view(bool)


# ---------------------------------------------------------------- the runner
class TextDetRunner(Runner):
    family = "textdet"

    def load(self) -> None:
        import onnxruntime as ort

        onnx_path, cfg_path, self.source, self.revision = locate_files(self.model, self.settings)
        self.trained = is_trained(onnx_path.parent)  # the PP-OCRv4 det from the wheel: SOURCE.json says pretrained
        cfg = json.loads(cfg_path.read_text())
        self.defaults = DetParams.from_settings(self.settings)
        self.input_size = self.defaults.limit_side_len
        mean = np.asarray(cfg.get("mean", (0.5, 0.5, 0.5)), np.float32)
        std = np.asarray(cfg.get("std", (0.5, 0.5, 0.5)), np.float32)
        self._mean, self._std = [np.float32(v) for v in mean], [np.float32(v) for v in std]
        self._lut = normalise_lut(self._mean, self._std)
        # ORT_DEVICE_PREPROCESS (auto: on accelerators): the resize and normalisation run as ONNX
        # nodes in front of the model (workers/devprep.py); the host sends uint8
        self.device_prep = devprep.wanted(self.settings.ort_device_preprocess, self.device.kind)
        model: str | bytes = str(onnx_path)
        in_name = cfg.get("input_name")
        if self.device_prep:
            model = devprep.with_device_preprocess(str(onnx_path), in_name or "x", self._mean, self._std)
            in_name = devprep.IMAGE
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.device.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.device.kind == "cpu" and not self.settings.ort_spinning:  # as onnxseg: idle intra-op threads sleep, the cores decode and post-process
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # through OrtModel as every ONNX family: on CUDA the input is IO-bound (ORT_IO_BINDING) and
        # TensorRT is tried first with ORT_TENSORRT. The input's shape follows the image's size, so
        # no CUDA graphs (fixed_shapes=False: one graph per shape would be captured and kept).
        self.model_call = OrtModel(model, self.device, self.settings, so, fixed_shapes=False, input_name=in_name, output_name=cfg.get("output_name"))
        self.session = self.model_call.session
        self.input_name, self.output_name = self.model_call.input_name, self.model_call.output_name
        # Shapes differ from image to image (multiples of 32), so a batch runs as groups of equal
        # shape. On a CPU each image runs alone: a stacked call measured no faster per image
        # (PP-OCRv4 det, 2 cores: see docs/readme/core.md), and a group waits for its slowest.
        self.stack_groups = self.device.kind != "cpu"
        log.info(
            "loaded %s from %s on %s (limit %s %d, threads %d, providers %s, preprocess on the %s)",
            self.model,
            self.source,
            self.device,
            self.defaults.limit_type,
            self.defaults.limit_side_len,
            self.device.threads,
            self.session.get_providers(),
            "device" if self.device_prep else "host",
        )

    def warmup(self) -> None:
        s = self.defaults.limit_side_len if self.defaults.limit_type == "min" else 960
        s = max(32, int(round(s / 32)) * 32)
        if self.device_prep:
            self.raw_call(np.zeros((1, s, s, 3), np.uint8), (s, s))
        else:
            self.raw_call(np.zeros((1, 3, s, s), np.float32))
        self.warm = True

    def info(self) -> dict[str, Any]:
        return {**super().info(), "limit_type": self.defaults.limit_type, "preprocess": "device" if self.device_prep else "host", "reference": "rapidocr_onnxruntime==1.4.4 (ch_ppocr_det)"}

    # -- hooks -------------------------------------------------------------
    def prepare(self, item: Item) -> Prepared:
        params = self.defaults.with_overrides(getattr(item.req, "params", None))
        img = decode_bgr(item.data, self.settings.max_image_pixels)
        return self.preprocess(img, params)

    def preprocess(self, img: np.ndarray, params: DetParams | None = None) -> Prepared:
        """BGR uint8 image → the model's input, as RapidOCR makes it (used by `trifecta bench` too)."""
        p = params or self.defaults
        raw_hw = img.shape[:2]
        img, rh, rw = fit_sides(img, p.max_side_len)
        img, pad = pad_flat(img)
        h, w = img.shape[:2]
        th, tw = det_size(h, w, p.limit_side_len, p.limit_type)
        if th <= 0 or tw <= 0:  # DetPreProcess returns None: RapidOCR finds nothing
            x = np.zeros((3, 0, 0), np.float32)
        elif self.device_prep:  # the device resizes and normalises (workers/devprep.py)
            return Prepared(np.ascontiguousarray(img), (h, w), raw_hw, (rh, rw), pad, p, (th, tw))
        else:
            cv2 = _opencv()
            u = img if (th, tw) == (h, w) else cv2.resize(img, (tw, th))
            x = np.empty((3, th, tw), np.float32)
            # one table lookup per pixel, each channel plane written straight into the CHW tensor
            for c, plane in enumerate(cv2.split(u)):
                cv2.LUT(plane, self._lut[c], dst=x[c])
        return Prepared(x, (h, w), raw_hw, (rh, rw), pad, p)

    def raw_call(self, x: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        """One model call on N prepared inputs (`size`: the resize target with ORT_DEVICE_PREPROCESS)."""
        if size is None:
            return self.model_call.run(x)
        return self.model_call.run(x, {devprep.SIZE: devprep.size_input(size[0], size[1], len(x))})

    def predict(self, batch: list[Prepared]) -> list[np.ndarray | None]:
        out: list[np.ndarray | None] = [None] * len(batch)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(batch):
            if p.x.size:
                groups.setdefault((p.x.shape, p.size), []).append(i)
        for idx in groups.values():
            runs = [idx] if self.stack_groups and len(idx) > 1 else [[i] for i in idx]
            for run in runs:
                x = batch[run[0]].x[None] if len(run) == 1 else np.stack([batch[i].x for i in run])
                y = self.raw_call(x, batch[run[0]].size)
                for k, i in enumerate(run):
                    out[i] = y[k, 0]
        return out

    def finish(self, item: Item, prepared: Prepared, pred: np.ndarray | None) -> Produced:
        regions = self.regions(prepared, pred)
        mask = fill_quads([r["points"] for r in regions], prepared.raw_hw)  # the quadrilaterals as answered
        return Produced(masks={"mask": mask}, meta={"foreground_pixels": int(np.count_nonzero(mask)), "regions": regions})

    @staticmethod
    def regions(p: Prepared, pred: np.ndarray | None) -> list[dict[str, Any]]:
        """[{"points": [[x, y] x 4], "score"}] in the original image, in RapidOCR's order."""
        if pred is None:
            return []
        boxes, scores = db_boxes(pred, p.det_hw, p.params)
        boxes, scores = filter_boxes(boxes, scores, p.det_hw)
        if not boxes:
            return []
        order = sorted_order(boxes)
        quads = to_original(np.array([boxes[i] for i in order]), p)
        return [{"points": [[round(float(x), 2), round(float(y), 2)] for x, y in q], "score": round(float(scores[i]), 6)} for q, i in zip(quads, order, strict=True)]
