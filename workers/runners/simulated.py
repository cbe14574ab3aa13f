"""`simulated`: the textmask pipeline with an accelerator's cost shape in place of the model.

What a GPU worker's host does per image is all here, done by textmask's own code: the input is
decoded and preprocessed by the textmask runner's `prepare` (same decode, resize and
normalisation, same tensor), and a mask at the original image size comes back and is encoded
by the pipeline like textmask's. Only the model call is replaced: it sleeps

    SIM_BATCH_MS + SIM_IMAGE_MS x n        (n = images in the batch)

without using any CPU, the shape of a GPU call (a fixed launch and weight-read cost, then a
cost per image), so `trifecta bench --only simulated` shows how many images/s one worker's
host side can feed a device, and the CPU that costs per image, on a machine with no GPU.
The "prediction" is the first input channel above zero (bright pixels), taken in `finish`.

If the textmask runner cannot load here (no model file, or OpenCV missing from a minimal
install), a plain Pillow decode + resize + normalise stands in, and `info()["prepare"]` says so.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from PIL import Image

from tasks.images import decode_rgb
from workers.device import Device
from workers.runners.base import Item, Produced, Runner

log = logging.getLogger("trifecta.simulated")

FALLBACK_SIDE = 736  # PP-OCRv4 det's short side in RapidOCR (limit_type "min")


def tensor_and_sizes(prepared: Any) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """(C x H x W input, (h, w) of the image inside it, (h, w) of the original) from what the
    textmask runner's `prepare` returns: onnxseg's tuple (x, content, original) or textdet's
    `Prepared` (x, ..., raw_hw). The one place this module knows the runner's types."""
    if isinstance(prepared, tuple):
        x, content, raw = prepared
        return x, tuple(content), tuple(raw)  # type: ignore[return-value]
    x = prepared.x
    return x, (int(x.shape[1]), int(x.shape[2])), tuple(prepared.raw_hw)


class SimulatedRunner(Runner):
    family = "simulated"

    def load(self) -> None:
        from tasks.models import MODELS
        from workers.runners.base import runner_class

        self.source = "builtin"
        self.inner: Runner | None = None
        try:
            import cv2  # noqa: F401 - textmask's resize needs OpenCV; without it (a minimal install) the stand-in runs

            # textmask's runner on the CPU: only its prepare runs (its ONNX session is never called)
            inner = runner_class(MODELS["textmask"].family)("textmask", self.settings, Device("cpu", 0, None, self.device.threads))
            inner.load()
            self.inner = inner
            self.prepare_path = f"textmask ({type(inner).__name__}.prepare)"
            self.input_size = inner.input_size
        except (ImportError, FileNotFoundError, OSError) as e:
            self.prepare_path = f"pillow fallback ({type(e).__name__}: {e})"
            self.input_size = FALLBACK_SIDE
            log.warning("simulated: textmask's prepare is unavailable (%s); decoding with a Pillow stand-in", e)
        self.calls_ms = 0.0
        log.info("simulated model: %.1f ms + %.1f ms x n per call, prepare by %s", self.settings.sim_batch_ms, self.settings.sim_image_ms, self.prepare_path)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "prepare": self.prepare_path, "sim_batch_ms": self.settings.sim_batch_ms, "sim_image_ms": self.settings.sim_image_ms}

    def prepare(self, item: Item) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        if self.inner is not None:
            return tensor_and_sizes(self.inner.prepare(item))
        rgb = decode_rgb(item.data, self.settings.max_image_pixels)
        h, w = rgb.shape[:2]
        k = FALLBACK_SIDE / min(h, w)
        th, tw = max(32, round(h * k / 32) * 32), max(32, round(w * k / 32) * 32)
        u = np.asarray(Image.fromarray(rgb).resize((tw, th), Image.BILINEAR))
        x = np.empty((3, th, tw), np.float32)
        for c in range(3):
            np.multiply(u[:, :, 2 - c], np.float32(2 / 255.0), out=x[c], casting="unsafe")  # BGR, (x/255 - 0.5)/0.5
            x[c] -= 1.0
        return x, (th, tw), (h, w)

    def predict(self, batch: list[Any]) -> list[Any]:
        ms = self.settings.sim_batch_ms + self.settings.sim_image_ms * len(batch)
        time.sleep(ms / 1000)  # the device's time: no CPU held
        self.calls_ms += ms
        return batch

    def finish(self, item: Item, prepared: Any, pred: Any) -> Produced:
        x, (ch, cw), (h, w) = prepared
        mask = x[0, :ch, :cw] > 0
        if mask.shape != (h, w):
            # the device's map back to the image's size: OpenCV's bilinear on 0/255, at half. Not
            # Pillow's filtered resize (onnxseg's `resize_mask`): that measured 3.3 ms of this
            # runner's ~4 ms per 512x512 image, more than textmask's own post-processing costs
            import cv2

            mask = cv2.resize(mask.view(np.uint8) * np.uint8(255), (w, h), interpolation=cv2.INTER_LINEAR) >= 128
        return Produced(masks={"mask": mask}, meta={"foreground_pixels": int(np.count_nonzero(mask)), "simulated": True})
