"""Generic ONNX segmentation runner: `segmentation`, `textmask`, `facemask`.

The source service's contract: `segmentation.onnx` + `segmentation_config.json`
(`input_size`, `mean`, `std`, `background_class_id`, `input_name`, `output_name`);
foreground = argmax != background, mask returned at the original image size.
With `"head": "sigmoid"` and a `threshold` the same runner serves a probability map
(PP-OCRv4 text detection for `textmask`: mean/std 0.5, threshold 0.3, BGR input).
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tasks.images import decode_fitted
from workers.modelfiles import is_trained
from workers.onnxrun import OrtModel
from workers.runners.base import Item, Produced, Runner

log = logging.getLogger("trifecta.onnxseg")


@dataclass
class SegConfig:
    input_size: int = 512
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    background_class_id: int = 0
    input_name: str = "pixel_values"
    output_name: str = "logits"
    head: str = "argmax"  # "argmax" over classes, or "sigmoid" probability map
    threshold: float = 0.5
    channel_order: str = "RGB"
    multiple_of: int = 1  # input side rounded up to this (PP-OCR needs 32)
    resize: str = "stretch"  # "stretch" to S x S (the source service), or "letterbox" (keep aspect, pad)

    @classmethod
    def load(cls, path: Path) -> SegConfig:
        raw = json.loads(path.read_text())
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        for k in ("mean", "std"):
            if k in known:
                known[k] = tuple(float(x) for x in known[k])
        return cls(**known)


def locate_files(model: str, settings: Any) -> tuple[Path, Path, str, str | None]:
    """(onnx path, config path, source, revision) from HF_REPO_ID or MODEL_DIR."""
    onnx_name = {"segmentation": settings.seg_onnx_filename, "textmask": settings.textmask_onnx_filename, "facemask": settings.facemask_onnx_filename}[model]
    cfg_names = [settings.seg_config_filename] if model == "segmentation" else [f"{model}_config.json", settings.seg_config_filename]
    local = Path(settings.model_dir) / model
    use_hub = bool(settings.hf_repo_id) and not (model != "segmentation" and (local / onnx_name).is_file())
    if use_hub:
        from huggingface_hub import hf_hub_download

        kw = dict(repo_id=settings.hf_repo_id, revision=settings.hf_revision, token=settings.hf_token, local_files_only=settings.hf_local_files_only)
        onnx_path = Path(hf_hub_download(filename=onnx_name, **kw))
        cfg_path = None
        for name in cfg_names:
            try:
                cfg_path = Path(hf_hub_download(filename=name, **kw))
                break
            except Exception:  # noqa: BLE001 - try the next config name
                continue
        if cfg_path is None:
            raise FileNotFoundError(f"none of {cfg_names} in {settings.hf_repo_id}")
        return onnx_path, cfg_path, f"hf://{settings.hf_repo_id}/{onnx_name}", settings.hf_revision or "main"
    onnx_path = local / onnx_name
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no model for {model!r}: {onnx_path} does not exist (run `trifecta models fetch {model}` / `make install`, or set HF_REPO_ID)")
    cfg_path = next((local / n for n in cfg_names if (local / n).is_file()), None)
    if cfg_path is None:
        raise FileNotFoundError(f"no config ({' or '.join(cfg_names)}) next to {onnx_path}")
    rev = None
    meta = local / "SOURCE.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        return onnx_path, cfg_path, m.get("source", str(local)), m.get("revision")
    return onnx_path, cfg_path, str(local), rev


class OnnxSegRunner(Runner):
    family = "onnxseg"

    def load(self) -> None:
        import onnxruntime as ort

        onnx_path, cfg_path, self.source, self.revision = locate_files(self.model, self.settings)
        self.trained = is_trained(onnx_path.parent)  # a hub download has no SOURCE.json beside it: trained
        self.cfg = SegConfig.load(cfg_path)
        size = self.settings.input_size or self.cfg.input_size
        m = max(1, self.cfg.multiple_of)
        self.input_size = ((size + m - 1) // m) * m
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.device.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.device.kind == "cpu" and not self.settings.ort_spinning:
            # idle intra-op threads would spin on the very cores that decode and encode the
            # next images; they sleep instead (measured: decode+preprocess 5x faster next to the model)
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # providers, IO binding and CUDA graphs per device and settings (workers/onnxrun.py); the
        # input is always S x S, so CUDA graphs (ORT_CUDA_GRAPH) hold one graph per batch size
        self.model_call = OrtModel(str(onnx_path), self.device, self.settings, so, fixed_shapes=True, input_name=self.cfg.input_name, output_name=self.cfg.output_name)
        self.session = self.model_call.session
        self.input_name, self.output_name = self.model_call.input_name, self.model_call.output_name
        mean = np.asarray(self.cfg.mean, np.float32)
        std = np.asarray(self.cfg.std, np.float32)
        # x_norm = (x/255 - mean)/std = x * scale + offset, per channel, in one fused pass
        self._scale_c = [np.float32(x) for x in 1.0 / (255.0 * std)]
        self._offset_c = [np.float32(x) for x in -mean / std]
        log.info("loaded %s from %s on %s (input %d, threads %d, providers %s)", self.model, self.source, self.device, self.input_size, self.device.threads, self.session.get_providers())

    def warmup(self) -> None:
        x = np.zeros((1, 3, self.input_size, self.input_size), np.float32)
        self.raw_call(x)
        self.warm = True

    def content_size(self, h: int, w: int) -> tuple[int, int]:
        """(h, w) the image is resized to inside the S x S input: all of it ("stretch") or its letterboxed part."""
        s = self.input_size
        if self.cfg.resize == "letterbox":
            k = s / max(h, w)
            return max(1, min(s, round(h * k))), max(1, min(s, round(w * k)))
        return s, s

    def preprocess(self, rgb: np.ndarray, content: tuple[int, int] | None = None) -> tuple[np.ndarray, tuple[int, int]]:
        """H x W x 3 uint8 → (3 x S x S float32 normalised, (h, w) of the content inside it).

        Used by the runner and by `trifecta bench`. Letterboxing pads with the mean colour
        (0 after normalisation) so every input has the same shape and batches stack.
        `content` is the target size when `rgb` was already shrunk by a scaled decode.
        """
        s = self.input_size
        h, w = rgb.shape[:2]
        ch, cw = content or self.content_size(h, w)
        # uint8, H x W x 3; through Pillow only when a resize is needed
        u = rgb if (h, w) == (ch, cw) else resize_rgb(rgb, ch, cw)
        out = np.empty((3, s, s), np.float32)
        if ch < s:
            out[:, ch:, :] = 0.0
        if cw < s:
            out[:, :ch, cw:] = 0.0
        order = (2, 1, 0) if self.cfg.channel_order == "BGR" else (0, 1, 2)

        def rows(a: int, z: int) -> None:
            # one fused pass per channel straight into the CHW output: uint8 * scale + offset
            # (no float HWC intermediate, no separate transpose copy)
            for c_out, c_in in enumerate(order):
                dst = out[c_out, a:z, :cw]
                np.multiply(u[a:z, :, c_in], self._scale_c[c_out], out=dst, casting="unsafe")
                dst += self._offset_c[c_out]

        n = min(self.device.threads, max(1, ch * cw // _ROWS_SPLIT_PIXELS))
        if n <= 1:
            rows(0, ch)
        else:  # numpy releases the GIL in ufuncs: a big image is normalised on the model's cores in parallel
            cut = [ch * i // n for i in range(n + 1)]
            list(_pool(n).map(lambda i: rows(cut[i], cut[i + 1]), range(n)))
        return out, (ch, cw)

    def prepare(self, item: Item) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        rgb, (h, w) = decode_fitted(item.data, self.settings.max_image_pixels, self.content_size)
        x, content = self.preprocess(rgb, self.content_size(h, w))
        return x, content, (h, w)

    def raw_call(self, x: np.ndarray) -> np.ndarray:
        return self.model_call.run(x)

    def predict(self, batch: list[tuple[np.ndarray, tuple[int, int], tuple[int, int]]]) -> list[np.ndarray]:
        x = np.stack([b[0] for b in batch]) if len(batch) > 1 else batch[0][0][None]
        y = self.raw_call(x)
        if self.cfg.head == "sigmoid":
            fg = (y[:, 0] if y.ndim == 4 else y) > self.cfg.threshold
        else:
            fg = y.argmax(axis=1) != self.cfg.background_class_id
        return list(fg)

    def finish(self, item: Item, prepared: tuple[np.ndarray, tuple[int, int], tuple[int, int]], pred: np.ndarray) -> Produced:
        (ch, cw), (h, w) = prepared[1], prepared[2]
        if self.cfg.resize == "letterbox":  # the content is the top-left ch x cw of the input, scaled to the output's size
            sh, sw = pred.shape
            pred = pred[: max(1, round(ch * sh / self.input_size)), : max(1, round(cw * sw / self.input_size))]
        mask = resize_mask(pred, h, w)
        return Produced(masks={"mask": mask}, meta={"foreground_pixels": int(np.count_nonzero(mask))})


_ROWS_SPLIT_PIXELS = 1 << 20  # below ~1 Mpx a thread hand-off costs more than it saves
_pools: dict[int, ThreadPoolExecutor] = {}


def _pool(n: int) -> ThreadPoolExecutor:
    p = _pools.get(n)
    if p is None:
        p = _pools.setdefault(n, ThreadPoolExecutor(max_workers=n, thread_name_prefix="normalise"))
    return p


_cv2: Any = None


def _opencv() -> Any:
    global _cv2
    if _cv2 is None:
        import cv2

        cv2.setNumThreads(1)  # the model's intra-op threads own the cores
        _cv2 = cv2
    return _cv2


def resize_rgb(rgb: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of an H x W x 3 uint8 image. Enlarging goes through OpenCV's SIMD
    bilinear: 0.3 ms where Pillow took 1.8-3.9 ms for 451x300 -> 640x640 (a tenth of the
    worker's CPU per image beside a 40 ms model call), within one grey level of Pillow's
    (tests/test_decode.py). Shrinking stays with Pillow, whose bilinear filter widens with the
    scale (antialiased; OpenCV's INTER_LINEAR is not); big JPEGs are already shrunk in the DCT."""
    if h >= rgb.shape[0] and w >= rgb.shape[1]:
        cv2 = _opencv()
        return cv2.resize(np.ascontiguousarray(rgb), (w, h), interpolation=cv2.INTER_LINEAR)
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))


def resize_mask(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """A model-resolution bool mask → the original image size (bilinear, threshold at half)."""
    if mask.shape == (h, w):
        return mask
    im = Image.fromarray(mask.view(np.uint8) * np.uint8(255), mode="L").resize((w, h), Image.BILINEAR)
    return np.asarray(im) >= 128


os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
