"""Model files on disk: the PP-OCRv4 detector for `textmask`, SegFormer exports for `segmentation`.

The detector is pretrained; SegFormer is exported pretrained from the hub, or random-init offline.

`textmask` is taken out of the `rapidocr_onnxruntime` wheel (Apache-2.0) without
importing rapidocr: from the installed distribution's files if it is installed, else
from the wheel that `pip download --no-deps` fetches, opened as a zip.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

log = logging.getLogger("trifecta.models")

RAPIDOCR_DIST = "rapidocr_onnxruntime"
RAPIDOCR_VERSION = "1.4.4"
DET_MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
# What workers/runners/textdet.py reads; its pre- and post-processing are RapidOCR 1.4.4's
# (`TEXTMASK_*` settings). An older `textmask_config.json` (the letterboxed sigmoid-threshold
# config of the generic onnxseg runner) is rewritten by `fetch_textmask`.
TEXTMASK_CONFIG = {
    "family": "textdet",
    "reference": f"{RAPIDOCR_DIST}=={RAPIDOCR_VERSION} ch_ppocr_det (TextDetector + DBPostProcess)",
    "input_name": "x",
    "output_name": "sigmoid_0.tmp_0",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "channel_order": "BGR",
    "multiple_of": 32,
}


def is_trained(model_dir: str | Path) -> bool:
    """Whether the model in `model_dir` has learned anything, from the files next to it.

    Every checkpoint this project writes has a SOURCE.json with `pretrained`: true for the
    PP-OCRv4 det taken from the wheel and for hub exports, false for random-init and tiny
    checkpoints (`trifecta models tiny`, `export-onnx --random-init`). An older SOURCE.json
    without the field says so in its `source` text. No SOURCE.json at all: a hub id or the
    operator's own checkpoint, taken as trained."""
    meta = Path(model_dir) / "SOURCE.json"
    if not meta.is_file():
        return True
    m = json.loads(meta.read_text())
    if isinstance(m.get("pretrained"), bool):
        return bool(m["pretrained"])
    src = str(m.get("source", "")).lower()
    return not ("random-init" in src or "untrained" in src or "tiny" in src)


def _det_bytes() -> tuple[bytes, str]:
    try:
        dist = metadata.distribution(RAPIDOCR_DIST)
        path = Path(dist.locate_file(DET_MEMBER))
        if path.is_file():
            return path.read_bytes(), dist.version
    except metadata.PackageNotFoundError:
        pass
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", d, f"{RAPIDOCR_DIST}=={RAPIDOCR_VERSION}"],
            check=True,
        )
        wheel = next(Path(d).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            return z.read(DET_MEMBER), RAPIDOCR_VERSION


def fetch_textmask(model_dir: str, onnx_name: str = "textmask.onnx") -> Path:
    out = Path(model_dir) / "textmask"
    target = out / onnx_name
    cfg = out / "textmask_config.json"
    if target.is_file():
        if _read_json(cfg) != TEXTMASK_CONFIG:  # missing, or written for an older runner: the model stays, its config is rewritten
            cfg.write_text(json.dumps(TEXTMASK_CONFIG, indent=2))
            log.info("textmask: %s rewritten for the textdet runner", cfg)
        return target
    out.mkdir(parents=True, exist_ok=True)
    data, version = _det_bytes()
    target.write_bytes(data)
    cfg.write_text(json.dumps(TEXTMASK_CONFIG, indent=2))
    (out / "SOURCE.json").write_text(json.dumps({"source": f"{RAPIDOCR_DIST}=={version}:{DET_MEMBER} (PP-OCRv4 det, Apache-2.0)", "revision": version, "pretrained": True}, indent=2))
    log.info("textmask: PP-OCRv4 detection model written to %s", target)
    return target


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def export_segformer(out_dir: str, *, pretrained: str | None = None, random_init: bool = False, input_size: int = 512, revision: str | None = None) -> Path:
    """Export a SegFormer to `segmentation.onnx` + `segmentation_config.json`."""
    import torch
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if random_init or not pretrained:
        torch.manual_seed(0)
        cfg = SegformerConfig(
            num_labels=4, hidden_sizes=[16, 32, 64, 96], depths=[1, 1, 1, 1], num_attention_heads=[1, 2, 2, 4],
            decoder_hidden_size=64, sr_ratios=[8, 4, 2, 1],
        )
        model = SegformerForSemanticSegmentation(cfg)
        source, rev, trained = "random-init SegFormer (UNTRAINED: masks are meaningless; for wiring and load tests)", None, False
    else:
        model = SegformerForSemanticSegmentation.from_pretrained(pretrained, revision=revision)
        source, rev, trained = f"hf://{pretrained}", revision or "main", True
    model.eval()

    class Logits(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.m(pixel_values=pixel_values).logits

    x = torch.zeros(1, 3, input_size, input_size)
    target = out / "segmentation.onnx"
    torch.onnx.export(
        Logits(model), (x,), str(target), input_names=["pixel_values"], output_names=["logits"],
        dynamic_axes={"pixel_values": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch", 2: "out_height", 3: "out_width"}}, opset_version=17, dynamo=False,
    )
    (out / "segmentation_config.json").write_text(
        json.dumps({"input_size": input_size, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "background_class_id": 0, "input_name": "pixel_values", "output_name": "logits"}, indent=2)
    )
    (out / "SOURCE.json").write_text(json.dumps({"source": source, "revision": rev, "pretrained": trained}, indent=2))
    return target


def ensure_segmentation(model_dir: str, pretrained: str = "nvidia/segformer-b0-finetuned-ade-512-512") -> str:
    """A segmentation model for `make up`: the pretrained export if the hub answers, else random-init (loudly)."""
    out = Path(model_dir) / "segmentation"
    if (out / "segmentation.onnx").is_file():
        return json.loads((out / "SOURCE.json").read_text()).get("source", str(out)) if (out / "SOURCE.json").is_file() else str(out)
    try:
        export_segformer(str(out), pretrained=pretrained)
        return f"hf://{pretrained}"
    except Exception as e:  # noqa: BLE001 - offline or hub refused: fall back, loudly
        banner = "!" * 78
        log.warning("\n%s\n! segmentation: the hub is unreachable (%s).\n! Falling back to an UNTRAINED random-init SegFormer: its masks are meaningless.\n! Set HF_REPO_ID or run `trifecta export-onnx --pretrained ID` when online.\n%s", banner, str(e)[:120], banner)
        export_segformer(str(out), random_init=True)
        return "random-init"
