"""`mask2former`: multi-class semantic segmentation (`Mask2FormerForUniversalSegmentation`, ADE20K).

One model call answers every class: a request names the classes it wants (`params.classes`:
names, `"all"`, default wall/floor/ceiling/window) and gets one mask per class at the
original image size, so `/segment-batch` costs one inference where the source service's
client made four `/segment` calls. With `classes="all"` the answer is one mask per class
present plus a label-map PNG (`labels.png`, pixel = class id).

The label map is the one transformers' own recipe gives on the same input, pixel for pixel
(`tests/test_parity_torch.py` checks it over HTTP):

1. EXIF orientation applied; an image whose long side is over M2F_LONG_SIDE is scaled down
   to it first (Pillow bilinear), as the source service did: the one deliberate step before
   the reference recipe, bounding decode-to-model work on phone photos.
2. The checkpoint's own image processor (`AutoImageProcessor`: its resize rule, size divisor,
   rescale and normalisation), called on that image exactly as a user would.
3. The model; then the processor's `post_process_semantic_segmentation` scores (mask logits at
   384 x 384, softmax class scores without the null class x sigmoid masks, summed over queries).
4. Those scores resized (bilinear) to the ORIGINAL image size and argmax: what
   `post_process_semantic_segmentation(target_sizes=[(H, W)])` does, computed without its
   C x H x W tensor (150 x 24 MP in float32 is the 13.67 GiB the source service died
   allocating): see `upsample_labels`.

Images of one processed shape share one forward; images over M2F_MAX_PIXELS are refused with
422 before any work.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from storage import codecs
from tasks import seglabels
from tasks.errors import Unprocessable
from tasks.images import decode_rgb
from tasks.settings import Settings
from workers.modelfiles import is_trained
from workers.runners.base import Item, Produced, Runner
from workers.torchopt import maybe_compile, torch_dtype

log = logging.getLogger("trifecta.mask2former")
# OpenMP threads that spin while they wait take the cores this worker's other threads (decode,
# encode, heartbeat) and other processes need: V-JEPA 2 ran 2x slower with spinning on a loaded
# 2-core machine. It must be set before torch is imported, which happens in load().
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
MODEL = "mask2former"
BAND_BYTES = 64 << 20  # working memory of one band of the full-size upsampling

# ADE20K (SceneParse150) class names in id order, as the ADE20K Mask2Former checkpoints' id2label
# spell them; the tiny checkpoint is written with these, so the default classes resolve offline.
ADE20K_LABELS = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed ", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel",
    "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
]
assert len(ADE20K_LABELS) == 150


@dataclass
class Prepared:
    x: Any  # 3 x h x w float tensor: the image processor's pixel_values for this image
    size: tuple[int, int]  # (H, W) of the original (EXIF-oriented) image
    shrunk: tuple[int, int]  # (h, w) after the M2F_LONG_SIDE step, what the processor was given
    wanted: list[tuple[str, int]] | None  # (asked name, class id); None = all present classes
    label_map: bool


class Mask2FormerRunner(Runner):
    family = "mask2former"

    def __init__(self, model: str, settings: Settings, device: Any) -> None:
        super().__init__(model, settings, device)
        self.forwards = 0  # model forward passes (one per input shape in a batch)

    def load(self) -> None:
        import torch
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        torch.set_num_threads(max(1, self.device.threads))
        src = self.settings.m2f_checkpoint
        kw = {"token": self.settings.hf_token, "local_files_only": self.settings.hf_local_files_only}
        from workers.runners.vjepa2 import source_of

        self.source, self.revision = source_of(src)
        self.trained = is_trained(src)
        # the checkpoint's own processor, as a user loads it: its resize rule, size divisor,
        # rescale and normalisation, and the post-processing the label map must agree with
        self.processor = AutoImageProcessor.from_pretrained(src, **kw)
        self.dtype = torch_dtype(self.device, self.settings)  # TORCH_DTYPE; auto: fp16 on a GPU, fp32 on a CPU
        self.net = Mask2FormerForUniversalSegmentation.from_pretrained(src, dtype=self.dtype, **kw).eval().to(self.device.local)
        maybe_compile(self.net, self.settings, "Mask2Former")
        cfg = self.net.config
        n = int(cfg.num_labels)
        self.labels = [str(cfg.id2label.get(i, cfg.id2label.get(str(i), f"LABEL_{i}"))).strip() for i in range(n)]  # type: ignore[union-attr]
        self.long_side = self.settings.m2f_long_side
        self.input_size = self.long_side
        log.info("loaded Mask2Former from %s on %s: %d classes, long side %d, processor %s", self.source, self.device, n, self.long_side, type(self.processor).__name__)

    def warmup(self) -> None:
        import torch

        x = self._pixels(np.zeros((self.long_side * 3 // 4, self.long_side, 3), np.uint8))
        with torch.inference_mode():
            self._forward(x[None])
        self.forwards = 0  # count requests' forwards only
        self.warm = True

    def info(self) -> dict[str, Any]:
        return {**super().info(), "calls": self.calls, "forwards": self.forwards, "labels": self.labels, "long_side": self.long_side, "max_pixels": self.settings.m2f_max_pixels}

    # -- hooks -------------------------------------------------------------
    def prepare(self, item: Item) -> Prepared:
        p = item.req.params
        asked = seglabels.parse_names(p.get("classes"))
        if asked is None:
            asked = list(seglabels.DEFAULT_CLASSES)
        wanted = None if asked == seglabels.ALL else seglabels.resolve(asked, self.labels)  # type: ignore[arg-type]
        label_map = bool(p.get("label_map", asked == seglabels.ALL))
        full = decode_image(item.data, self.settings)
        rgb = shrink(full, self.long_side)
        return Prepared(self._pixels(rgb), full.shape[:2], rgb.shape[:2], wanted, label_map)

    def _pixels(self, rgb: np.ndarray) -> Any:
        """The image processor's `pixel_values` for one H x W x 3 uint8 image (resized, rescaled, normalised)."""
        rgb = rgb if rgb.flags.writeable else rgb.copy()  # torch.from_numpy warns on a read-only array
        return self.processor(images=rgb, return_tensors="pt")["pixel_values"][0]

    def _forward(self, x: Any) -> Any:
        import torch

        self.forwards += 1
        with torch.inference_mode():
            return self.net(pixel_values=x.to(self.device.local, dtype=self.dtype))

    def predict(self, batch: list[Prepared]) -> list[Any]:
        """One forward per processed input shape (images of one shape batch together; padding a
        small image up to a large one, as the processor does for a mixed batch, would change
        its answer), then the processor's semantic scores per image (C x 384 x 384)."""
        import torch

        groups: dict[tuple[int, ...], list[int]] = {}
        for i, b in enumerate(batch):
            groups.setdefault(tuple(b.x.shape), []).append(i)
        out: list[Any] = [None] * len(batch)
        for idx in groups.values():
            o = self._forward(torch.stack([batch[i].x for i in idx]))
            cls, masks = o.class_queries_logits.float(), o.masks_queries_logits.float()
            for j, i in enumerate(idx):
                one = _Outputs(class_queries_logits=cls[j : j + 1], masks_queries_logits=masks[j : j + 1])
                out[i] = self.processor.post_process_semantic_segmentation(one, return_segmentation_scores=True)[0].segmentation_scores.cpu()
        return out

    def finish(self, item: Item, prepared: Prepared, pred: Any) -> Produced:
        scores = pred
        H, W = prepared.size
        try:
            labels = upsample_labels(scores, (H, W))
        except (RuntimeError, MemoryError) as e:
            raise Unprocessable(f"the image ({W}x{H}) is too large to segment on this worker ({type(e).__name__}); downscale it and retry") from None
        masks: dict[str, np.ndarray] = {}
        blobs: dict[str, tuple[bytes, str, str]] = {}
        classes = []
        if prepared.wanted is None:
            ids, counts = np.unique(labels, return_counts=True)
            for cid, n in zip(ids.tolist(), counts.tolist(), strict=True):
                name = seglabels.norm(self.labels[cid])
                key = seglabels.key_for(name)
                masks[key] = labels == cid
                classes.append({"name": name, "label": self.labels[cid], "id": cid, "key": key, "pixels": n})
        else:
            for name, cid in prepared.wanted:
                key = seglabels.key_for(name)
                m = labels == cid
                masks[key] = m
                classes.append({"name": name, "label": self.labels[cid], "id": cid, "key": key, "pixels": int(np.count_nonzero(m))})
        if prepared.label_map:
            blobs["labels.png"] = (codecs.encode_label_map(labels), "png", "image/png")
        present = sorted({int(c) for c in np.unique(labels).tolist()})
        meta = {"classes": classes, "size": [H, W], "model_input": list(prepared.x.shape[-2:]), "present": [seglabels.norm(self.labels[c]) for c in present]}
        return Produced(masks=masks, blobs=blobs, meta=meta)


@dataclass
class _Outputs:
    """The two fields of the model's output `post_process_semantic_segmentation` reads."""

    class_queries_logits: Any
    masks_queries_logits: Any


def shrink(rgb: np.ndarray, long_side: int) -> np.ndarray:
    """The source service's step before the processor: a long side over `long_side` scaled
    down to it (Pillow bilinear, sizes rounded); a smaller image is left as it is."""
    H, W = rgb.shape[:2]
    k = long_side / max(H, W)
    if k >= 1:
        return rgb
    h, w = max(1, round(H * k)), max(1, round(W * k))
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))


def decode_image(data: bytes, settings: Settings) -> np.ndarray:
    """RGB with EXIF orientation applied; over M2F_MAX_PIXELS → 422 before the pixels are decoded."""
    from tasks.images import probe

    _, w, h = probe(data, settings.max_image_pixels)
    if w * h > settings.m2f_max_pixels:
        raise Unprocessable(seglabels.too_large_message(w, h, settings.m2f_max_pixels))
    return decode_rgb(data, settings.max_image_pixels)


def upsample_labels(scores: Any, size: tuple[int, int]) -> np.ndarray:
    """Class scores C x h x w (the processor's 384 x 384 semantic scores) → the H x W class-id map
    `post_process_semantic_segmentation(target_sizes=[(H, W)])` gives, identical pixel for pixel,
    without its C x H x W float tensor.

    Why not that call: at 24 MP it allocates 150 x 24 M floats (13.67 GiB). Rows cannot be
    banded exactly (a band's own resize maps its pixel centres differently), so this works per
    class instead: torch's bilinear resize computes every output element from its own four
    neighbours with the same arithmetic whatever the channel count (its generic CPU kernel; the
    exceptions are handled below), so resizing a subset of the classes gives those classes'
    exact values, and a running argmax over them in class order picks what argmax over all
    picks (ties go to the lower id, as torch's argmax). Classes that cannot win anywhere are
    skipped: a bilinear value lies between the smallest and largest of its four neighbours, so
    a class whose largest value in every 2 x 2 cell of the grid is below the best smallest value
    of some class there never wins (with a margin for float rounding). Memory: one chunk of
    classes at full size (BAND_BYTES, at least one class), the running best and the map. Time:
    like the reference's own resize for the classes kept; a trained model's scores leave a few
    classes per image, a random-init model's nearly flat scores keep all of them."""
    import torch
    import torch.nn.functional as F

    H, W = size
    scores = scores.float()
    C = scores.shape[0]
    dtype = np.uint8 if C <= 256 else np.uint16
    if H + W <= 128 or C <= 4 or C * H * W * 4 <= BAND_BYTES:
        # small: the reference call itself (torch picks a channels-last kernel, whose values
        # depend on the channel count, for outputs with H + W <= 128 and for exactly 3 channels
        # on one thread: subsets of such a call would not match it)
        up = F.interpolate(scores[None], size=(H, W), mode="bilinear", align_corners=False)[0]
        return up.argmax(0).numpy().astype(dtype)
    ids = _candidates(scores)
    per = max(1, BAND_BYTES // (H * W * 4))
    chunks = [ids[i : i + per] for i in range(0, len(ids), per)]
    # torch resizes exactly 3 channels with another kernel on one thread: never ask for 3
    chunks = [part for c in chunks for part in ((c[:2], c[2:]) if len(c) == 3 else (c,))]
    best: Any = None
    label: Any = None
    for chunk in chunks:
        up = F.interpolate(scores[None, chunk], size=(H, W), mode="bilinear", align_corners=False)[0]
        vals, idx = up.max(0)  # the first of equal maxima: the lowest id of the chunk
        del up
        ids_t = torch.tensor(chunk, dtype=torch.int16)
        if best is None:
            best, label = vals, ids_t[idx]
            continue
        better = vals > best  # strict: on a tie the lower id (an earlier chunk) stays, as argmax
        torch.maximum(best, vals, out=best)
        label = torch.where(better, ids_t[idx], label)
    return label.numpy().astype(dtype, copy=False)


def _candidates(scores: Any) -> list[int]:
    """Classes that can win somewhere in a bilinear resize of `scores` (C x h x w), in id order."""
    import torch
    import torch.nn.functional as F

    s = scores[None]
    hi = F.max_pool2d(s, 2, stride=1, ceil_mode=True)[0] if min(s.shape[-2:]) > 1 else s[0]
    lo = -F.max_pool2d(-s, 2, stride=1, ceil_mode=True)[0] if min(s.shape[-2:]) > 1 else s[0]
    margin = 1e-4 * (1.0 + float(scores.abs().max()))
    floor = lo.max(0).values  # per cell: the best class's smallest corner
    can = (hi >= floor[None] - margin).flatten(1).any(1)
    return [int(c) for c in torch.nonzero(can).flatten().tolist()]


Runner = Mask2FormerRunner  # the family registry's naming convention


# ---------------------------------------------------------------- checkpoints: tiny, Swin-L (bench), offline fallback
SWIN_L_ADE = {  # facebook/mask2former-swin-large-ade-semantic's architecture
    "backbone": {"embed_dim": 192, "depths": [2, 2, 18, 2], "num_heads": [6, 12, 24, 48], "window_size": 12, "image_size": 384, "drop_path_rate": 0.3},
    "model": {"num_queries": 100, "hidden_dim": 256, "feature_size": 256, "mask_feature_size": 256, "encoder_layers": 6, "decoder_layers": 10, "dim_feedforward": 2048, "encoder_feedforward_dim": 1024, "num_attention_heads": 8},
}
TINY = {
    "backbone": {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "window_size": 4, "image_size": 64, "drop_path_rate": 0.0},
    "model": {"num_queries": 8, "hidden_dim": 32, "feature_size": 32, "mask_feature_size": 32, "encoder_layers": 1, "decoder_layers": 2, "dim_feedforward": 64, "encoder_feedforward_dim": 64, "num_attention_heads": 2},
}


def write_random(out: str, arch: dict[str, Any] | None = None, labels: list[str] | None = None, long_side: int = 768, source: str | None = None) -> str:
    """A random-init Mask2Former (+ image processor config) written with `save_pretrained`."""
    import torch
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, SwinConfig

    arch = arch or TINY
    labels = labels or ADE20K_LABELS
    torch.manual_seed(0)
    bb = SwinConfig(out_features=["stage1", "stage2", "stage3", "stage4"], **arch["backbone"])
    extra = {"init_std": 2.0} if arch is TINY else {}  # wide init: the tiny model's masks vary across an image
    cfg = Mask2FormerConfig(backbone_config=bb, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}, **arch["model"], **extra)
    model = Mask2FormerForUniversalSegmentation(cfg).eval()
    if arch is TINY and labels is ADE20K_LABELS:
        _favour_defaults(model)
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(d))
    # the processor scales an image's long side to `long_side` (then up to a multiple of 32), so
    # with M2F_LONG_SIDE at the same value the model sees the shrunk image at its own size
    Mask2FormerImageProcessor(size={"shortest_edge": long_side, "longest_edge": long_side}, size_divisor=32).save_pretrained(str(d))
    n_params = sum(p.numel() for p in model.parameters())
    desc = source or f"random-init Mask2Former (Swin embed {arch['backbone']['embed_dim']}, depths {arch['backbone']['depths']}, {n_params / 1e6:.1f} M parameters; UNTRAINED: masks are meaningless)"
    (d / "SOURCE.json").write_text(json.dumps({"source": desc, "revision": None, "pretrained": False}, indent=2))
    return str(d)


def _favour_defaults(model: Any) -> None:
    """Swap class-head rows so the classes this random model predicts most often become
    wall, floor, ceiling and windowpane: still a random-init model, but the default masks
    of the tiny checkpoint are not all empty, so tests can check pixels."""
    import torch

    g = torch.Generator().manual_seed(1)
    probes = [torch.randn(1, 3, 96, 128, generator=g) for _ in range(3)]
    ramp = torch.linspace(-2, 2, 128).view(1, 1, 1, 128).expand(1, 3, 96, 128).contiguous()
    counts = torch.zeros(model.config.num_labels)
    with torch.inference_mode():
        for x in [*probes, ramp, ramp.transpose(2, 3).contiguous()]:
            o = model(pixel_values=x)
            s = torch.einsum("bqc,bqhw->bchw", o.class_queries_logits.softmax(-1)[..., :-1], o.masks_queries_logits.sigmoid())
            counts += torch.bincount(s[0].argmax(0).flatten(), minlength=model.config.num_labels).float()
    targets = [ADE20K_LABELS.index(n) for n in ("wall", "floor", "ceiling", "windowpane")]
    top = [int(i) for i in counts.argsort(descending=True)[:4]]
    perm = list(range(model.class_predictor.weight.shape[0]))  # perm[new row] = old row
    for t, s in zip(targets, top, strict=True):
        perm[t] = s
    for new, old in zip([s for s in top if s not in targets], [t for t in targets if t not in top], strict=True):
        perm[new] = old
    lin = model.class_predictor
    lin.weight.data = lin.weight.data[perm].clone()
    lin.bias.data = lin.bias.data[perm].clone()


TINY_LONG_SIDE = 256  # the tiny checkpoint's processor: long side 256 (tests run M2F_LONG_SIDE=256)


def write_tiny(out: str) -> str:
    return write_random(out, long_side=TINY_LONG_SIDE)


def ensure(settings: Settings) -> str:
    """`trifecta up` with MODELS including mask2former: the checkpoint if it can be fetched, else a tiny one (loudly)."""
    src = settings.m2f_checkpoint
    if (Path(src) / "config.json").is_file():
        return f"mask2former: local checkpoint {src}"
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(src, allow_patterns=["*.json", "*.safetensors"], token=settings.hf_token, local_files_only=settings.hf_local_files_only)
        return f"mask2former: hf://{src}"
    except Exception as e:  # noqa: BLE001 - offline, or the hub refused
        from workers.runners.vjepa2 import _loud

        tiny = Path(settings.model_dir) / "mask2former-tiny"
        if not (tiny / "config.json").is_file():
            write_tiny(str(tiny))
        os.environ["M2F_CHECKPOINT"] = str(tiny)  # the workers `trifecta up` starts next inherit it
        _loud("mask2former", src, e, tiny)
        return f"mask2former: UNTRAINED tiny random-init checkpoint at {tiny}"


def _register() -> None:
    from workers.tiny import register_ensure

    register_ensure(MODEL, ensure)  # its tiny writer is named by its ModelSpec (tasks/models.py)


_register()
