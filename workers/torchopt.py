"""Precision and compilation of the torch families (SAM3, Mask2Former, V-JEPA 2), from settings.

    dtype = torch_dtype(device, settings, prefer_bf16=True)   # TORCH_DTYPE
    maybe_compile(net.vision_encoder, settings)               # IMAGE_MODEL_COMPILE

The choice itself is the pure `workers.device.torch_dtype_name`; this module only asks torch
what the GPU supports and applies it. Imported by torch workers only.
"""

from __future__ import annotations

import logging
from typing import Any

from workers.device import Device, torch_dtype_name

log = logging.getLogger("trifecta.torch")


def torch_dtype(dev: Device, settings: Any, prefer_bf16: bool = False) -> Any:
    import torch

    bf16 = dev.kind == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return getattr(torch, torch_dtype_name(dev, prefer_bf16=prefer_bf16, setting=getattr(settings, "torch_dtype", "auto"), bf16_supported=bf16 or dev.kind != "cuda"))


def maybe_compile(module: Any, settings: Any, name: str = "model") -> bool:
    """`module.compile()` in place (the module keeps its type and attributes; the first call
    of each input shape compiles) when IMAGE_MODEL_COMPILE is on."""
    if not getattr(settings, "image_model_compile", False):
        return False
    module.compile()
    log.info("torch.compile on %s (IMAGE_MODEL_COMPILE): the first call per input shape compiles", name)
    return True
