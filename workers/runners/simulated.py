"""`simulated`: the textmask pipeline with an accelerator's cost shape in place of the model.

What a GPU textmask worker's host does per image is all here, done by textmask's own code: the
input is decoded and prepared by the textmask runner's `prepare` as it runs on an accelerator
(ORT_DEVICE_PREPROCESS, workers/devprep.py: decode, RapidOCR's own scaling and padding on the
host; the resize and normalisation are nodes of the device's graph), and a mask at the original
image size comes back and is encoded by the pipeline like textmask's. Only the model call is
replaced: it sleeps

    SIM_BATCH_MS + SIM_IMAGE_MS x n        (n = images in the batch)

without using any CPU, the shape of a GPU call (a fixed launch and weight-read cost, then a
cost per image), so `trifecta bench --only simulated` shows how many images/s one worker's
host side can feed a device, and the CPU that costs per image, on a machine with no GPU.
The "prediction" is the image's first (blue) channel above half (bright pixels), taken in
`finish` at the original size.

If the textmask runner cannot load here (no model file, or OpenCV or onnx missing from a
minimal install), a plain Pillow decode stands in, and `info()["prepare"]` says so.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from tasks.images import decode_rgb
from workers.device import Device
from workers.runners.base import Item, Produced, Runner

log = logging.getLogger("trifecta.simulated")

FALLBACK_SIDE = 736  # PP-OCRv4 det's short side in RapidOCR (limit_type "min")


class SimulatedRunner(Runner):
    family = "simulated"

    def load(self) -> None:
        from tasks.models import MODELS
        from workers.runners.base import runner_class

        self.source = "builtin"
        self.inner: Runner | None = None
        try:
            import cv2  # noqa: F401 - textmask's scaling needs OpenCV; without it (a minimal install) the stand-in runs

            # textmask's runner as it runs on an accelerator (the device resizes and normalises):
            # only its prepare runs here, its ONNX session is never called
            s = self.settings.model_copy(update={"ort_device_preprocess": "on"})
            inner = runner_class(MODELS["textmask"].family)("textmask", s, Device("cpu", 0, None, self.device.threads))
            inner.load()
            self.inner = inner
            self.prepare_path = f"textmask ({type(inner).__name__}.prepare, ORT_DEVICE_PREPROCESS=on)"
            self.input_size = inner.input_size
        except (ImportError, FileNotFoundError, OSError) as e:
            self.prepare_path = f"pillow fallback ({type(e).__name__}: {e})"
            self.input_size = FALLBACK_SIDE
            log.warning("simulated: textmask's prepare is unavailable (%s); decoding with a Pillow stand-in", e)
        self.calls_ms = 0.0
        log.info("simulated model: %.1f ms + %.1f ms x n per call, prepare by %s", self.settings.sim_batch_ms, self.settings.sim_image_ms, self.prepare_path)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "prepare": self.prepare_path, "sim_batch_ms": self.settings.sim_batch_ms, "sim_image_ms": self.settings.sim_image_ms}

    def prepare(self, item: Item) -> tuple[np.ndarray, int, tuple[int, int]]:
        """(the H x W x 3 uint8 image the device is sent, rows of padding above it, original (h, w))."""
        if self.inner is not None:
            p = self.inner.prepare(item)
            return p.x, p.pad_top, tuple(p.raw_hw)  # type: ignore[attr-defined, return-value]
        bgr = decode_rgb(item.data, self.settings.max_image_pixels)[..., ::-1]
        return bgr, 0, bgr.shape[:2]

    def predict(self, batch: list[Any]) -> list[Any]:
        ms = self.settings.sim_batch_ms + self.settings.sim_image_ms * len(batch)
        time.sleep(ms / 1000)  # the device's time: no CPU held
        self.calls_ms += ms
        return batch

    def finish(self, item: Item, prepared: Any, pred: Any) -> Produced:
        img, pad, (h, w) = prepared
        if img.ndim != 3 or not img.size:  # too thin to detect in (textmask answers nothing)
            mask = np.zeros((h, w), bool)
        else:
            mask = img[pad : img.shape[0] - pad, :, 0] > 127
            if mask.shape != (h, w):  # RapidOCR scaled it (a side over 2000 px): back to the original size
                import cv2

                mask = cv2.resize(mask.view(np.uint8) * np.uint8(255), (w, h), interpolation=cv2.INTER_LINEAR) >= 128
        return Produced(masks={"mask": mask}, meta={"foreground_pixels": int(np.count_nonzero(mask)), "simulated": True})
