"""`vjepa2`: V-JEPA 2 video classification of 16-frame clips (`VJEPA2ForVideoClassification`).

Every clip reaches the model through the batched `trifecta.infer` path, whoever sent it:
`/api/v1/infer` (one clip, waited for), a `frames` job (clips sent by a streaming
consumer, answered by polling or a callback) or a `video` job (a whole video, decoded here).
So clips from many jobs and clients share one model call.

Multi-clip jobs (decoding a video in chunks, recording each clip with its job, the timeline)
are `workers/clipjobs.py`; this runner only drops the clips of a job already over and hands
each batch's clip results to it.

Preprocessing is the checkpoint's own `VJEPA2VideoProcessor` (shortest-edge resize, centre
crop, rescale, ImageNet normalisation). A video job runs its resize and crop on the decoding
worker and ships the cropped frames (JPEG, small enough to ride inside the queue message);
the classifying worker then applies only the rescale and normalisation.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks import clips as clipc
from tasks.errors import Conflict, TrifectaError, Unprocessable
from tasks.images import decode_rgb
from tasks.schemas import InferRequest
from tasks.settings import Settings
from workers.clipjobs import ClipJobs, is_hex
from workers.modelfiles import is_trained
from workers.runners.base import BatchStats, ExtraTask, Item, Produced, Runner, TaskContext
from workers.torchopt import maybe_compile, torch_dtype

log = logging.getLogger("trifecta.vjepa2")
# OpenMP threads that spin while they wait take the cores this worker's other threads (decode,
# encode, heartbeat) and other processes need: V-JEPA 2 ran 2x slower with spinning on a loaded
# 2-core machine. It must be set before torch is imported, which happens in load().
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
MODEL = "vjepa2"
JPEG_QUALITY = 95  # prepared clip frames (already at the model's input size) travel as JPEG


# ---------------------------------------------------------------- checkpoint sources
def _hf_kwargs(settings: Settings) -> dict[str, Any]:
    return {"token": settings.hf_token, "local_files_only": settings.hf_local_files_only}


def source_of(src: str) -> tuple[str, str | None]:
    """(source, revision) for /models/info; a tiny or random-init dir says so from its SOURCE.json."""
    meta = Path(src) / "SOURCE.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        return m.get("source", src), m.get("revision")
    return (src if Path(src).is_dir() else f"hf://{src}"), (None if Path(src).is_dir() else "main")


# ---------------------------------------------------------------- the runner
@dataclass
class PreparedClip:
    x: Any  # T x 3 x S x S float tensor
    top_k: int


class VJEPA2Runner(Runner):
    family = "vjepa2"

    def __init__(self, model: str, settings: Settings, device: Any) -> None:
        super().__init__(model, settings, device)
        self.jobs: ClipJobs | None = None  # multi-clip jobs, once extra_tasks ran
        self.clips_classified = 0

    def load(self) -> None:
        import torch
        from transformers import VJEPA2ForVideoClassification, VJEPA2VideoProcessor

        torch.set_num_threads(max(1, self.device.threads))
        src = self.settings.vjepa2_checkpoint
        self.source, self.revision = source_of(src)
        self.trained = is_trained(src)
        dtype = torch_dtype(self.device, self.settings)  # TORCH_DTYPE; auto: fp16 on a GPU, fp32 on a CPU
        self.net = VJEPA2ForVideoClassification.from_pretrained(src, dtype=dtype, **_hf_kwargs(self.settings)).eval().to(self.device.local)
        maybe_compile(self.net, self.settings, "V-JEPA 2")
        self.processor = VJEPA2VideoProcessor.from_pretrained(src, **_hf_kwargs(self.settings))
        cfg = self.net.config
        self.labels = [str(cfg.id2label.get(i, cfg.id2label.get(str(i), f"LABEL_{i}"))) for i in range(cfg.num_labels)]  # type: ignore[union-attr]
        crop = self.processor.crop_size
        self.crop = int(crop["height"] if isinstance(crop, dict) else getattr(crop, "height", crop))
        self.frames_per_clip = self.settings.vjepa2_frames_per_clip
        self.input_size = self.crop
        self.dtype = dtype
        log.info("loaded V-JEPA 2 from %s on %s: %d labels, crop %d, %d frames per clip", self.source, self.device, len(self.labels), self.crop, self.frames_per_clip)

    # -- the checkpoint's video processor, in two steps so video jobs can ship prepared frames --
    def resize_crop(self, frames: np.ndarray) -> np.ndarray:
        """T x H x W x 3 uint8 RGB → T x crop x crop x 3 uint8: the processor's resize and centre crop."""
        x = self.processor(videos=frames, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values_videos"][0]
        return x.permute(0, 2, 3, 1).contiguous().numpy()

    def to_tensor(self, frames: np.ndarray, prepared: bool) -> Any:
        """T x h x w x 3 uint8 RGB → T x 3 x crop x crop float: the processor's whole transform
        (only its rescale and normalisation for frames `resize_crop` already prepared)."""
        kw = {"do_resize": False, "do_center_crop": False} if prepared else {}
        return self.processor(videos=frames, return_tensors="pt", **kw)["pixel_values_videos"][0]

    def warmup(self) -> None:
        import torch

        c = self.crop
        with torch.inference_mode():
            self.net(pixel_values_videos=torch.zeros(1, self.frames_per_clip, 3, c, c, dtype=self.dtype, device=self.device.local))
        self.warm = True

    def info(self) -> dict[str, Any]:
        return {**super().info(), "frames_per_clip": self.frames_per_clip, "num_labels": len(self.labels), "calls": self.calls, "clips": self.clips_classified}

    # -- hooks -------------------------------------------------------------
    def decode_clip(self, data: bytes) -> tuple[np.ndarray, bool]:
        """A clip container → (T x H x W x 3 uint8 RGB, whether it is already prepared)."""
        header, frames = clipc.unpack_clip(data)
        n = len(frames)
        if n != self.frames_per_clip:
            raise Unprocessable(f"got {n} frames; a clip is exactly {self.frames_per_clip} frames")
        w, h, fmt = int(header["width"]), int(header["height"]), str(header.get("format", "RGB")).upper()
        if w * h > self.settings.max_image_pixels:
            raise Unprocessable(f"frames of {w}x{h} are over MAX_IMAGE_PIXELS")
        out = np.empty((n, h, w, 3), np.uint8)
        for i, f in enumerate(frames):
            if len(f) == w * h * 3:
                a = np.frombuffer(f, np.uint8).reshape(h, w, 3)
                out[i] = a[:, :, ::-1] if fmt == "BGR" else a
            else:
                try:
                    a = decode_rgb(f, self.settings.max_image_pixels)
                except TrifectaError as e:
                    raise Unprocessable(f"frame {i} could not be decoded: {e.message}") from None
                if a.shape[:2] != (h, w):
                    raise Unprocessable(f"frame {i} is {a.shape[1]}x{a.shape[0]}; the clip says {w}x{h}")
                out[i] = a
        prepared = bool(header.get("prepared"))
        if prepared and (h, w) != (self.crop, self.crop):
            raise Unprocessable(f"a prepared clip must be {self.crop}x{self.crop}, got {w}x{h}")
        return out, prepared

    def prepare(self, item: Item) -> PreparedClip:
        k = item.req.params.get("top_k", self.settings.vjepa2_top_k)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k:
            raise Unprocessable("top_k must be a positive integer")
        frames, prepared = self.decode_clip(item.data)
        return PreparedClip(self.to_tensor(frames, prepared), min(k, len(self.labels)))

    def predict(self, batch: list[PreparedClip]) -> list[list[dict[str, Any]]]:
        import torch

        x = torch.stack([b.x for b in batch]).to(self.device.local, dtype=self.dtype)
        with torch.inference_mode():
            probs = self.net(pixel_values_videos=x).logits.float().softmax(-1).cpu()
        self.clips_classified += len(batch)
        out = []
        for b, p in zip(batch, probs, strict=True):
            v, i = p.topk(b.top_k)
            out.append([{"label": self.labels[int(j)], "confidence": round(float(c), 6)} for c, j in zip(v, i, strict=True)])
        return out

    def finish(self, item: Item, prepared: PreparedClip, pred: list[dict[str, Any]]) -> Produced:
        return Produced(meta={"predictions": pred, "clip_id": str(uuid.UUID(item.req.id.split(".")[0])) if is_hex(item.req.id) else item.req.id})

    def run_batch(self, items: list[Item], stats: BatchStats | None = None) -> list[Produced | TrifectaError]:
        if self.jobs is None:
            return super().run_batch(items, stats)
        # clips of a cancelled (or already failed) job are dropped before the model sees them
        ended = self.jobs.ended_parents({str(it.req.params["parent"]) for it in items if it.req.params.get("parent")})
        out: list[Produced | TrifectaError | None] = [None] * len(items)
        live = []
        for i, it in enumerate(items):
            parent = it.req.params.get("parent")
            if parent and str(parent) in ended:
                out[i] = Conflict(f"job {parent} is {ended[str(parent)]}; its remaining clips are dropped")
            else:
                live.append(i)
        for i, res in zip(live, super().run_batch([items[i] for i in live], stats) if live else [], strict=True):
            out[i] = res
        parts = [(items[i].req, out[i]) for i in live if items[i].req.params.get("parent")]
        if parts:
            try:
                self.jobs.record(parts)  # type: ignore[arg-type]
            except Exception:  # noqa: BLE001 - the clips' own results still go out
                log.exception("recording %d clip results failed", len(parts))
        return out  # type: ignore[return-value]

    def dropped(self, failed: list[tuple[InferRequest, dict[str, Any]]]) -> None:
        """A clip that never reached the model (dead-lettered, expired, input unreadable) is
        recorded with its job like a clip that failed in it, so the job still finishes."""
        parts = [(q, err) for q, err in failed if q.params.get("parent")]
        if parts and self.jobs is not None:
            self.jobs.record(parts)

    # -- video jobs ----------------------------------------------------------
    def extra_tasks(self, ctx: TaskContext) -> list[ExtraTask]:
        self.jobs = ClipJobs(self, ctx)  # decode chunks, clip recording, timeline assembly: workers/clipjobs.py
        jobs = self.jobs

        def video(job_id: str, chunk: int, first_clip: int, start_frame: int, start_pts: int | None = None) -> None:
            jobs.run_chunk(job_id, chunk, first_clip, start_frame, start_pts)

        return [ExtraTask(clipc.TASK_VIDEO, video, acks_late=True)]


Runner = VJEPA2Runner  # the family registry's naming convention


# ---------------------------------------------------------------- checkpoints: tiny, bench, offline fallback
# A few Something-Something-v2 class names: the tiny checkpoint's id2label (written from this list, no download).
TINY_LABELS = [
    "Pushing something from left to right",
    "Pushing something from right to left",
    "Moving something up",
    "Moving something down",
    "Putting something on a surface",
    "Picking something up",
    "Turning something upside down",
    "Opening something",
    "Closing something",
    "Holding something",
]


def write_random(out: str, *, crop: int = 32, hidden: int = 32, layers: int = 2, heads: int = 2, labels: list[str] | None = None, source: str | None = None) -> str:
    """A random-init `VJEPA2ForVideoClassification` + video processor config, saved with `save_pretrained`."""
    import torch
    from transformers import VJEPA2Config, VJEPA2ForVideoClassification, VJEPA2VideoProcessor

    labels = labels or TINY_LABELS
    torch.manual_seed(0)
    cfg = VJEPA2Config(
        crop_size=crop, frames_per_clip=16, hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers, mlp_ratio=4.0,
        num_pooler_layers=1, pred_hidden_size=16, pred_num_attention_heads=2, pred_num_hidden_layers=1, pred_num_mask_tokens=2,
        id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
    )
    model = VJEPA2ForVideoClassification(cfg).eval()
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(d))
    VJEPA2VideoProcessor(crop_size=crop).save_pretrained(str(d))
    n_params = sum(p.numel() for p in model.parameters())
    desc = source or f"random-init V-JEPA 2 (hidden {hidden}, {layers} layers, crop {crop}, {n_params / 1e6:.2f} M parameters; UNTRAINED: labels are meaningless)"
    (d / "SOURCE.json").write_text(json.dumps({"source": desc, "revision": None, "pretrained": False}, indent=2))
    return str(d)


def write_tiny(out: str) -> str:
    return write_random(out)


def ensure(settings: Settings) -> str:
    """`trifecta up` with MODELS including vjepa2: the checkpoint if it can be fetched, else a tiny one (loudly)."""
    src = settings.vjepa2_checkpoint
    if (Path(src) / "config.json").is_file():
        return f"vjepa2: local checkpoint {src}"
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(src, allow_patterns=["*.json", "*.safetensors"], token=settings.hf_token, local_files_only=settings.hf_local_files_only)
        return f"vjepa2: hf://{src}"
    except Exception as e:  # noqa: BLE001 - offline, or the hub refused
        tiny = Path(settings.model_dir) / "vjepa2-tiny"
        if not (tiny / "config.json").is_file():
            write_tiny(str(tiny))
        os.environ["VJEPA2_CHECKPOINT"] = str(tiny)  # the workers `trifecta up` starts next inherit it
        _loud("vjepa2", src, e, tiny)
        return f"vjepa2: UNTRAINED tiny random-init checkpoint at {tiny}"


def _loud(name: str, src: str, e: Exception, tiny: Path) -> None:
    banner = "!" * 78
    msg = (
        f"\n{banner}\n! {name}: the checkpoint {src} cannot be fetched ({str(e).splitlines()[0][:100] if str(e) else type(e).__name__}).\n"
        f"! Falling back to an UNTRAINED tiny random-init checkpoint at {tiny}:\n"
        f"! the service runs end to end, but its answers are MEANINGLESS.\n"
        f"! Fetch the real one when online (unset HF_LOCAL_FILES_ONLY) or point the setting at a local directory.\n{banner}"
    )
    log.warning(msg)
    print(msg, flush=True)


def _register() -> None:
    from workers.tiny import register, register_ensure

    register(MODEL, write_tiny)
    register_ensure(MODEL, ensure)


_register()
