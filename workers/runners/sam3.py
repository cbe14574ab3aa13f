"""SAM3 (Segment Anything 3) image segmentation on transformers' `Sam3Model` / `Sam3Processor`.

    trifecta worker --model sam3 --device cpu|cuda:N

One request = one image and its prompts (`tasks.sam3`: text prompts, box exemplars,
a confidence threshold). Every text prompt is one query; all queries of a request share
the image's vision features, so the vision encoder (the ViT, by far the largest part)
runs once per image. Those features are also kept in a `FeatureCache` keyed by the
image's SHA-256 (`ENABLE_FEATURE_CACHE`), and the API routes every request for the same
image to the same worker's private queue, so new prompts on an image seen before skip
the encoder altogether (`cache_hit` in the result meta).

Outputs: `instances.json` (`tasks.sam3.RESULT_KEY`) holds, per query, the COCO-RLE masks
at the image's size, boxes as normalised [cx, cy, w, h] and scores, most confident first.
Jobs (`/v1/jobs`, shard jobs) also get `mask`: the union of all instances, in the
job's mask format.

The checkpoint is `SAM3_CHECKPOINT` (a hub id such as facebook/sam3, a `sam3_video`
checkpoint whose detector is loaded, or a local directory); `IMAGE_MODEL_RESOLUTION`
resizes the model's input (global-attention positions are computed for that size).
fp32 on a CPU; bf16 (fp16 where the GPU lacks bf16) on a GPU.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from storage import codecs
from tasks.images import decode_rgb
from tasks.routing import image_key
from tasks.sam3 import MODEL, RESULT_KEY, Query, Sam3Params, parse_params
from tasks.settings import Settings
from workers.featcache import FeatureCache
from workers.modelfiles import is_trained
from workers.runners.base import ExtraTask, Item, Produced, Runner, TaskContext
from workers.torchopt import maybe_compile, torch_dtype

log = logging.getLogger("trifecta.sam3")

QUERY_CHUNK = 8  # text queries decoded in one call; bounds pred_masks memory (queries x 200 x 288 x 288)


@dataclass
class Prepared:
    key: str  # sha256 of the image bytes (+ resolution): the feature cache key
    rgb: np.ndarray
    params: Sam3Params
    threshold: float


@dataclass
class Prediction:
    """Per query: scores (sorted, above threshold), boxes xyxy normalised, low-res mask probabilities."""

    queries: list[Query]
    scores: list[Any] = field(default_factory=list)
    boxes: list[Any] = field(default_factory=list)
    masks: list[Any] = field(default_factory=list)
    cache_hit: bool = False
    vision_ms: float = 0.0
    decoder_ms: float = 0.0


def detector_config(cfg: Any) -> Any:
    """The `Sam3Config` inside a checkpoint's config: itself, or a `sam3_video` config's detector."""
    det = getattr(cfg, "detector_config", None)
    return det if det is not None else cfg


def source_of(src: str) -> tuple[str, str | None]:
    meta = Path(src) / "SOURCE.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        return m.get("source", src), m.get("revision")
    return (src if Path(src).is_dir() else f"hf://{src}"), (None if Path(src).is_dir() else "main")


class Sam3Runner(Runner):
    family = "sam3"

    def __init__(self, model: str, settings: Settings, device: Any) -> None:
        super().__init__(model, settings, device)
        self.cache: FeatureCache[Any] | None = None
        self._model_lock = threading.Lock()  # one model call at a time; decode and encode overlap it
        self.vision_calls = 0

    # -- load and warm up ------------------------------------------------------
    def load(self) -> None:
        import torch
        from transformers import AutoConfig, Sam3Model, Sam3Processor

        torch.set_num_threads(max(1, self.device.threads))
        src = self.settings.sam3_checkpoint
        kw: dict[str, Any] = {}
        if not Path(src).is_dir():
            kw = {"token": self.settings.hf_token, "local_files_only": self.settings.hf_local_files_only}
        self.source, self.revision = source_of(src)
        self.trained = is_trained(src)
        cfg = detector_config(AutoConfig.from_pretrained(src, **kw))
        patch = int(cfg.vision_config.backbone_config.patch_size)
        res = self.settings.image_model_resolution
        if res:
            cfg.image_size = max(patch, res // patch * patch)  # global-attention positions follow the config's size
        self.input_size = int(cfg.image_size)
        self.dtype = torch_dtype(self.device, self.settings, prefer_bf16=True)  # TORCH_DTYPE; auto: bf16 (fp16 without it) on a GPU, fp32 on a CPU
        self.torch_device = torch.device(self.device.local)
        self.net = Sam3Model.from_pretrained(src, config=cfg, dtype=self.dtype, **kw).to(self.torch_device).eval()
        maybe_compile(self.net.vision_encoder, self.settings, "SAM3's vision encoder")  # IMAGE_MODEL_COMPILE: the encoder is most of an image's cost
        self.processor = Sam3Processor.from_pretrained(src, **kw)
        self.processor.image_processor.size = {"height": self.input_size, "width": self.input_size}
        self.processor.target_size = self.input_size
        s = self.settings
        if s.enable_feature_cache:
            self.cache = FeatureCache(max_entries=s.feature_cache_max_entries, max_bytes=s.feature_cache_max_mb << 20, ttl_s=s.feature_cache_ttl_seconds, size_of=_features_bytes)
        log.info(
            "loaded sam3 from %s on %s (input %d px, %s, feature cache %s)",
            self.source,
            self.device,
            self.input_size,
            str(self.dtype).removeprefix("torch."),
            "on" if self.cache is not None else "off",
        )

    def warmup(self) -> None:
        from tasks.sam3 import Box

        rgb = np.full((self.input_size, self.input_size, 3), 127, np.uint8)
        params = Sam3Params(("object",), (Box(0.5, 0.5, 0.25, 0.25, True),), 1.0)
        self._run_one(Prepared("warmup", rgb, params, 1.0), use_cache=False)
        self.warm = True

    def info(self) -> dict[str, Any]:
        out = super().info()
        out["feature_cache"] = self.cache.stats() if self.cache is not None else None
        out["vision_calls"] = self.vision_calls
        return out

    def extra_tasks(self, ctx: TaskContext) -> list[ExtraTask]:
        """Video sessions (`workers/runners/sam3_video.py`) on this worker, when it serves VIDEO_SESSION_MODEL."""
        if self.settings.video_session_model != self.model:
            return []
        from workers.runners.sam3_video import session_tasks
        from workers.sam3video.tracker import Sam3VideoTracker

        return session_tasks(ctx, Sam3VideoTracker(self.settings, self.device, self.dtype))

    # -- hooks -------------------------------------------------------------------
    def prepare(self, item: Item) -> Prepared:
        params = parse_params(item.req.params, max_prompts=self.settings.max_prompts)
        rgb = decode_rgb(item.data, self.settings.max_image_pixels)
        th = params.confidence_threshold
        return Prepared(f"{image_key(item.data)}:{self.input_size}", rgb, params, self.settings.image_model_confidence_threshold if th is None else th)

    def predict(self, batch: list[Prepared]) -> list[Prediction]:
        return [self._run_one(p, use_cache=self.cache is not None) for p in batch]

    def finish(self, item: Item, prepared: Prepared, pred: Prediction) -> Produced:
        t0 = time.perf_counter()
        h, w = prepared.rgb.shape[:2]
        union = np.zeros((h, w), bool) if item.req.kind == "job" else None
        results = []
        for q, scores, boxes, masks in zip(pred.queries, pred.scores, pred.boxes, pred.masks, strict=True):
            rles = []
            for m in masks:  # one mask at a time: a full-size float mask per instance is the memory peak
                full = _upsample(m, h, w)
                rles.append(codecs.encode_rle(full))
                if union is not None:
                    union |= full
            results.append(
                {
                    "prompt": q.text if q.is_text else None,
                    "masks": rles,
                    "boxes": [_cxcywh(b) for b in boxes],
                    "scores": [round(float(s), 6) for s in scores],
                    "num_masks": len(rles),
                }
            )
        post_ms = (time.perf_counter() - t0) * 1000
        n = sum(r["num_masks"] for r in results)
        doc = {"image_size": {"width": w, "height": h}, "results": results}
        meta = {
            "num_masks": n,
            "num_queries": len(results),
            "cache_hit": pred.cache_hit,
            "image_size": {"width": w, "height": h},
            "image_key": prepared.key.split(":")[0],
            "vision_ms": round(pred.vision_ms, 2),
            "decoder_ms": round(pred.decoder_ms, 2),
            "inference_time_ms": round(pred.vision_ms + pred.decoder_ms + post_ms, 2),
        }
        blobs = {RESULT_KEY: (orjson.dumps(doc), "rle", "application/json")}
        return Produced(masks={"mask": union} if union is not None else {}, blobs=blobs, meta=meta)

    # -- the model -----------------------------------------------------------------
    def _run_one(self, p: Prepared, *, use_cache: bool) -> Prediction:
        import torch

        pred = Prediction(queries=p.params.queries())
        with self._model_lock, torch.inference_mode():
            t0 = time.perf_counter()
            cache = self.cache if use_cache else None
            feats = cache.get(p.key) if cache is not None else None
            pred.cache_hit = feats is not None
            if feats is None:
                feats = self._vision(p.rgb)
                if cache is not None:
                    cache.put(p.key, feats)
            t1 = time.perf_counter()
            for i in range(0, len(pred.queries), QUERY_CHUNK):
                self._decode(feats, pred.queries[i : i + QUERY_CHUNK], p.threshold, pred)
            t2 = time.perf_counter()
        pred.vision_ms, pred.decoder_ms = (t1 - t0) * 1000, (t2 - t1) * 1000
        return pred

    def _vision(self, rgb: np.ndarray) -> tuple[Any, ...]:
        """The image's FPN features (what the decoder reads), kept on the device."""
        rgb = rgb if rgb.flags.writeable else rgb.copy()  # torch.from_numpy warns on a read-only array
        x = self.processor.image_processor(images=rgb, return_tensors="pt")["pixel_values"]
        out = self.net.get_vision_features(pixel_values=x.to(self.torch_device, dtype=self.dtype))
        self.vision_calls += 1
        self.calls += 1
        # the last FPN level and every position encoding are not image-specific or not read by
        # the detector: keep only the three levels the decoder uses, and one set of encodings
        self._pos = out.fpn_position_encoding
        return tuple(t.detach() for t in out.fpn_hidden_states[:-1])

    def _decode(self, feats: tuple[Any, ...], queries: list[Query], threshold: float, pred: Prediction) -> None:
        import torch
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

        n = len(queries)
        levels = tuple(t.expand(n, *t.shape[1:]) for t in feats)
        pos = tuple(t.expand(n, *t.shape[1:]) for t in self._pos)
        vision = Sam3VisionEncoderOutput(fpn_hidden_states=levels + (levels[-1],), fpn_position_encoding=pos)
        text = self.processor.tokenizer([q.text for q in queries], return_tensors="pt", padding="max_length", max_length=32)
        kw: dict[str, Any] = {}
        boxes = queries[0].boxes  # every query of a request shares the request's boxes
        if boxes:
            kw["input_boxes"] = torch.tensor([[b.as_list() for b in boxes]] * n, dtype=self.dtype, device=self.torch_device)
            kw["input_boxes_labels"] = torch.tensor([[int(b.label) for b in boxes]] * n, dtype=torch.long, device=self.torch_device)
        out = self.net(vision_embeds=vision, input_ids=text["input_ids"].to(self.torch_device), attention_mask=text["attention_mask"].to(self.torch_device), **kw)
        self.calls += 1
        scores = out.pred_logits.float().sigmoid()
        if out.presence_logits is not None:
            scores = scores * out.presence_logits.float().sigmoid()
        for i in range(n):
            s = scores[i]
            keep = torch.nonzero(s > threshold).flatten()
            keep = keep[torch.argsort(s[keep], descending=True)]
            pred.scores.append(s[keep].cpu().numpy())
            pred.boxes.append(out.pred_boxes[i, keep].float().clamp(0, 1).cpu().numpy())
            pred.masks.append(out.pred_masks[i, keep].float().sigmoid().cpu())


def _features_bytes(feats: tuple[Any, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in feats)


def _upsample(prob: Any, h: int, w: int) -> np.ndarray:
    """A low-resolution mask probability map → an h x w bool mask (bilinear, threshold 0.5, as Sam3Processor)."""
    import torch.nn.functional as F

    up = F.interpolate(prob[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    return (up > 0.5).numpy()


def _cxcywh(b: np.ndarray) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in b)
    return [round((x0 + x1) / 2, 6), round((y0 + y1) / 2, 6), round(x1 - x0, 6), round(y1 - y0, 6)]


# ---------------------------------------------------------------- tiny checkpoint and offline fallback
TINY_RESOLUTION = 112  # 8 x 8 patches of 14 px
TRACKER_MEMORY_DIM = 64  # fixed by transformers' tracker (memory attention's kv_in_dim=64); see tiny_config


def tiny_tokenizer() -> Any:
    """A CLIP tokenizer built here, with no download: the 256 byte-level symbols (alone and
    word-final) and CLIP's two special tokens; no merges, so every word is spelled out."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in alphabet:
            vocab[ch + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def tiny_config(vocab_size: int, res: int = TINY_RESOLUTION, hidden: int = 2 * TRACKER_MEMORY_DIM, vit: int = 32, max_objects: int = 2) -> Any:
    """A `Sam3VideoConfig` (detector + tracker, as facebook/sam3 ships) with every part tiny,
    able to detect and track objects through a video with random weights.

    Shapes: `hidden` (the FPN width, which the detector heads and the tracker share) is at
    least twice the tracker's memory width, which is fixed at 64 — transformers' memory
    attention reads memories through key/value projections of 64 inputs (`kv_in_dim=64` in
    Sam3TrackerVideoMemoryAttentionLayer), so `memory_encoder_output_channels` must be 64, and
    the FPN-wide object pointers join the memories split into 64-wide tokens (at a width of
    exactly 64 transformers' unsplit branch concatenates a 4-d tensor with 3-d memories and
    fails). The ViT, the largest part, stays `vit` wide.

    Video heuristics: random-init detection scores are about 0.25, under the trained 0.5,
    so detections pass at 0.1 here; at a text prompt (no object tracked yet) the first
    `max_objects` of them become the tracked objects (the tracker runs once per object per
    frame); later frames add none (`new_det_thresh` 1.0). Random masks match nothing, so
    association is switched off both ways: a track always counts as matched (never dropped as
    unmatched) and a detection never joins a track (never flagged as a duplicate); no hot
    start (`hotstart_delay` 0: frames come out as they are computed). So an object keeps its
    id through the video, however often it is propagated and from wherever.
    """
    from transformers import Sam3VideoConfig

    if hidden % TRACKER_MEMORY_DIM or hidden < 2 * TRACKER_MEMORY_DIM:
        raise ValueError(f"hidden must be a multiple of {TRACKER_MEMORY_DIM} (the tracker's memory width), at least {2 * TRACKER_MEMORY_DIM}")
    h2 = 2 * hidden
    g = res // 14
    vision = {
        "backbone_config": {
            "model_type": "sam3_vit_model",
            "hidden_size": vit,
            "intermediate_size": 2 * vit,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": res,
            "patch_size": 14,
            "window_size": 4,
            "global_attn_indexes": [1],
            "pretrain_image_size": 56,
        },
        "fpn_hidden_size": hidden,
        "backbone_feature_sizes": [[4 * g, 4 * g], [2 * g, 2 * g], [g, g]],
    }
    detector = {
        "model_type": "sam3",
        "vision_config": vision,
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": h2,
            "projection_dim": hidden,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 32,
            "hidden_act": "gelu",
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        "geometry_encoder_config": {"hidden_size": hidden, "num_layers": 1, "num_attention_heads": 2, "intermediate_size": h2},
        "detr_encoder_config": {"hidden_size": hidden, "num_layers": 1, "num_attention_heads": 2, "intermediate_size": h2},
        "detr_decoder_config": {"hidden_size": hidden, "num_layers": 1, "num_queries": 16, "num_attention_heads": 2, "intermediate_size": h2},
        "mask_decoder_config": {"hidden_size": hidden, "num_attention_heads": 2},
    }
    tracker = {
        "model_type": "sam3_tracker_video",
        "vision_config": vision,
        "prompt_encoder_config": {"hidden_size": hidden, "image_size": res, "patch_size": 14},
        "mask_decoder_config": {"hidden_size": hidden, "mlp_dim": h2, "num_hidden_layers": 2, "num_attention_heads": 2, "iou_head_hidden_dim": hidden},
        "memory_attention_hidden_size": hidden,
        "memory_attention_num_layers": 1,
        "memory_attention_num_attention_heads": 1,
        "memory_attention_feed_forward_hidden_size": h2,
        "memory_encoder_hidden_size": hidden,
        "memory_encoder_output_channels": TRACKER_MEMORY_DIM,
        "mask_downsampler_embed_dim": hidden,
        "memory_fuser_embed_dim": hidden,
        "memory_fuser_intermediate_dim": h2,
        "image_size": res,
    }
    video = {
        "score_threshold_detection": 0.1,
        "new_det_thresh": 1.0,
        "max_num_objects": max_objects,
        "trk_assoc_iou_thresh": 0.0,
        "assoc_iou_thresh": 1.01,
        "hotstart_delay": 0,
        "hotstart_unmatch_thresh": 0,
        "hotstart_dup_thresh": 0,
    }
    return Sam3VideoConfig(detector_config=detector, tracker_config=tracker, low_res_mask_size=4 * g, **video)


def wake_random_heads(model: Any) -> None:
    """Two heads of a random-init `Sam3VideoModel` set so the video pipeline has something to carry.

    - The detector's mask logits are about ±0.03 at random init, and the video model turns a
      detection into a tracked object through `logits >= 0.5`: every new object would start
      from an empty mask. Its pixel projection is scaled up (x100, signs unchanged, so image
      masks thresholded at 0 keep their pixels) to give logits of a few units.
    - The tracker's object-presence head decides per frame whether the object is there at all
      (below 0 its mask is blanked): it is set to always answer "present".
    A trained checkpoint learns both; these only make random weights exercise every path."""
    import torch

    with torch.no_grad():
        proj = model.detector_model.mask_decoder.instance_projection
        proj.weight.mul_(100.0)
        proj.bias.mul_(100.0)
        head = model.tracker_model.mask_decoder.pred_obj_score_head.proj_out
        head.weight.zero_()
        head.bias.fill_(10.0)


def write_processors(out: str | Path, tokenizer: Any, res: int) -> None:
    """Image, video and tokenizer configs for every SAM3 processor class, in one directory."""
    from transformers import Sam3ImageProcessor, Sam3VideoProcessor
    from transformers.models.sam2_video.video_processing_sam2_video import Sam2VideoVideoProcessor

    g = 4 * (res // 14)
    ip = Sam3ImageProcessor(size={"height": res, "width": res}, mask_size={"height": g, "width": g})
    vp = Sam2VideoVideoProcessor(size={"height": res, "width": res})
    Sam3VideoProcessor(image_processor=ip, video_processor=vp, tokenizer=tokenizer).save_pretrained(str(out))


def write_tiny(out: str) -> str:
    """`trifecta models tiny sam3 DIR`: a random-init checkpoint of SAM3's whole architecture
    (detector + tracker, as facebook/sam3), tiny, with a tokenizer written here, no download."""
    import torch
    from transformers import Sam3VideoModel

    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    cfg = tiny_config(len(tok))
    torch.manual_seed(0)
    model = Sam3VideoModel(cfg)
    wake_random_heads(model)
    model.save_pretrained(str(path))
    write_processors(path, tok, TINY_RESOLUTION)
    (path / "SOURCE.json").write_text(json.dumps({"source": "random-init (tiny)", "revision": None, "pretrained": False}))
    return str(path)


def write_random_full(out: str) -> str:
    """A random-init checkpoint of the real detector architecture (default `Sam3Config`) with the
    tiny tokenizer: the benchmark's stand-in for facebook/sam3 where the hub cannot be reached."""
    import torch
    from transformers import Sam3Config, Sam3Model

    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    cfg = Sam3Config()
    cfg.text_config.vocab_size = len(tok)
    cfg.text_config.bos_token_id, cfg.text_config.eos_token_id, cfg.text_config.pad_token_id = 0, 1, 1
    torch.manual_seed(0)
    Sam3Model(cfg).save_pretrained(str(path))
    write_processors(path, tok, int(cfg.image_size))
    (path / "SOURCE.json").write_text(json.dumps({"source": "random-init (full size)", "revision": None, "pretrained": False}))
    return str(path)


def ensure(settings: Settings) -> str:
    """`trifecta up` with MODELS including sam3: the checkpoint if it can be fetched, else a tiny one (loudly)."""
    src = settings.sam3_checkpoint
    if (Path(src) / "config.json").is_file():
        return f"sam3: local checkpoint {src}"
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.txt"], token=settings.hf_token, local_files_only=settings.hf_local_files_only)
        return f"sam3: hf://{src}"
    except Exception as e:  # noqa: BLE001 - offline, gated without a token, or the hub refused
        tiny = Path(settings.model_dir) / "sam3-tiny"
        if not (tiny / "config.json").is_file():
            write_tiny(str(tiny))
        os.environ["SAM3_CHECKPOINT"] = str(tiny)  # the workers `trifecta up` starts next inherit it
        banner = "!" * 78
        msg = (
            f"\n{banner}\n! sam3: the checkpoint {src} cannot be fetched ({str(e).splitlines()[0][:100] if str(e) else type(e).__name__}).\n"
            f"! Falling back to an UNTRAINED tiny random-init SAM3 at {tiny}:\n"
            f"! the endpoints answer end to end, but the masks are MEANINGLESS.\n"
            f"! facebook/sam3 is gated: accept its licence, set HF_TOKEN, or point SAM3_CHECKPOINT at a local directory.\n{banner}"
        )
        log.warning(msg)
        print(msg, flush=True)
        return f"sam3: UNTRAINED tiny random-init checkpoint at {tiny}"


def _register() -> None:
    from workers.tiny import register_ensure

    register_ensure(MODEL, ensure)  # its tiny writer is named by its ModelSpec (tasks/models.py)


_register()
