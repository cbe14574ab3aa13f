"""The one list of model names shared by `--model`, `MODELS`, queue names and job payloads."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # runner family in workers/runners/<family>.py
    takes_images: bool  # usable by the image sync endpoints and WebDataset shard jobs
    description: str


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("segmentation", "onnxseg", True, "ONNX semantic segmentation (SegFormer export); foreground = argmax != background"),
        ModelSpec("textmask", "textdet", True, "PP-OCRv4 text detection (pretrained, ONNX) as RapidOCR runs it; filled text regions + their quadrilaterals"),
        ModelSpec("facemask", "onnxseg", True, "ONNX face mask; answers 204 until a model is served"),
        ModelSpec("sam3", "sam3", True, "SAM3 (Segment Anything 3) with text and box prompts, video sessions"),
        ModelSpec("vjepa2", "vjepa2", False, "V-JEPA 2 video classification on 16-frame clips"),
        ModelSpec("mask2former", "mask2former", True, "Mask2Former multi-class semantic segmentation"),
        ModelSpec("echo", "echo", True, "no-op model for measurement and tests"),
        ModelSpec("simulated", "simulated", True, "textmask's decode and mask encoding around a model call that sleeps SIM_BATCH_MS + SIM_IMAGE_MS x n (a GPU's cost shape, no CPU): measures what one worker's host side can feed a device"),
    )
}
MODEL_NAMES: tuple[str, ...] = tuple(MODELS)
# what `make up` / `trifecta up` serve without MODELS: the pretrained text detector (real masks on
# the first request, no torch needed) and the free no-op model; an untrained model runs only when asked for
DEFAULT_MODELS: tuple[str, ...] = ("textmask", "echo")
