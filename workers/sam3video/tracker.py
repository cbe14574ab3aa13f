"""SAM3 video models behind one small tracker: transformers' text (`Sam3VideoModel`) and box/point (`Sam3TrackerVideoModel`) sessions, frame results merged."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from storage import codecs
from tasks.sam3_video import VideoPrompt
from tasks.settings import Settings

log = logging.getLogger("trifecta.sam3_video")


# ---------------------------------------------------------------- the model
@dataclass
class FrameResult:
    frame_index: int
    obj_ids: list[int]
    masks: list[np.ndarray]  # H x W bool each, at the video's size
    boxes: list[list[float]]  # [cx, cy, w, h] normalised
    scores: list[float]

    def objects(self) -> list[dict[str, Any]]:
        """The source service's per-frame objects: `{"id", "mask" (COCO RLE), "box", "score"}`."""
        return [{"id": i, "mask": codecs.encode_rle(m), "box": b, "score": sc} for i, m, b, sc in zip(self.obj_ids, self.masks, self.boxes, self.scores, strict=True)]


class Sam3VideoTracker:
    """transformers' SAM3 video models, each loaded from SAM3_CHECKPOINT at its first use:

    - text prompts: `Sam3VideoModel` / `Sam3VideoProcessor` (the detector finds every object
      matching the text on each frame, the tracker follows them);
    - box and point prompts: `Sam3TrackerVideoModel` / `Sam3TrackerVideoProcessor`, the same
      checkpoint's tracker (transformers maps a sam3_video checkpoint onto it: the detector's
      ViT, `tracker_neck`, `tracker_model.*`), one object per prompt.

    With both loaded, the tracker uses the video model's ViT (the same weights, by that
    mapping) instead of a second copy. The model runs one call at a time (`lock`)."""

    def __init__(self, settings: Settings, device: Any, dtype: Any = None) -> None:
        self.settings, self.device, self._dtype = settings, device, dtype
        self.net: Any = None
        self.processor: Any = None
        self.tnet: Any = None
        self.tprocessor: Any = None
        self.lock = threading.Lock()
        self._load_lock = threading.Lock()

    def _kw(self) -> dict[str, Any]:
        src = self.settings.sam3_checkpoint
        return {} if Path(src).is_dir() else {"token": self.settings.hf_token, "local_files_only": self.settings.hf_local_files_only}

    def _setup(self) -> None:
        import torch

        self.dtype = self._dtype or torch.float32
        self.torch_device = torch.device(self.device.local)

    def load_text(self) -> None:
        """At the first text prompt: an image-only deployment never pays for the video model's memory."""
        with self._load_lock:
            if self.net is not None:
                return
            from transformers import Sam3VideoModel, Sam3VideoProcessor

            self._setup()
            src, t0 = self.settings.sam3_checkpoint, time.time()
            self.processor = Sam3VideoProcessor.from_pretrained(src, **self._kw())
            self.net = Sam3VideoModel.from_pretrained(src, dtype=self.dtype, **self._kw()).to(self.torch_device).eval()
            self._share_backbone()
            log.info("loaded Sam3VideoModel from %s on %s in %.1fs", src, self.device, time.time() - t0)

    def load_geometric(self) -> None:
        """At the first box or point prompt."""
        with self._load_lock:
            if self.tnet is not None:
                return
            from transformers import Sam3TrackerVideoModel, Sam3TrackerVideoProcessor

            self._setup()
            src, t0 = self.settings.sam3_checkpoint, time.time()
            self.tprocessor = Sam3TrackerVideoProcessor.from_pretrained(src, **self._kw())
            self.tnet = Sam3TrackerVideoModel.from_pretrained(src, dtype=self.dtype, **self._kw()).to(self.torch_device).eval()
            self._share_backbone()
            log.info("loaded Sam3TrackerVideoModel from %s on %s in %.1fs", src, self.device, time.time() - t0)

    def _share_backbone(self) -> None:
        if self.net is None or self.tnet is None:
            return
        ours, theirs = self.tnet.vision_encoder.backbone, self.net.detector_model.vision_encoder.backbone
        if ours is not theirs and _same_module(ours, theirs):
            self.tnet.vision_encoder.backbone = theirs  # the ViT is most of SAM3: hold it once

    # -- sessions of the models ----------------------------------------------------------
    def pixels(self, frames: list[np.ndarray], cache: dict[str, Any], text: bool) -> Any:
        """The video resized and normalised for a model, once per session: both models read the
        checkpoint's one video processor config, so their sessions share the same tensor."""
        vp = (self.processor if text else self.tprocessor).video_processor
        key = vp.to_json_string()
        if key not in cache:
            cache[key] = vp(videos=frames, device="cpu", return_tensors="pt").pixel_values_videos[0].to(self.dtype)
        return cache[key]

    def new_state(self, frames: list[np.ndarray], cache: dict[str, Any]) -> Any:
        """A text-prompt session (Sam3VideoModel)."""
        from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession

        self.load_text()
        return self._session(Sam3VideoInferenceSession, self.pixels(frames, cache, True), frames)

    def new_geometric_state(self, frames: list[np.ndarray], cache: dict[str, Any]) -> Any:
        """A box/point session (Sam3TrackerVideoModel)."""
        from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoInferenceSession

        self.load_geometric()
        return self._session(Sam3TrackerVideoInferenceSession, self.pixels(frames, cache, False), frames)

    def _session(self, cls: Any, pixels: Any, frames: list[np.ndarray]) -> Any:
        # what the processors' init_video_session builds, from pixels already made (no second copy)
        h, w = frames[0].shape[:2]
        dev = self.torch_device
        return cls(video=pixels, video_height=h, video_width=w, inference_device=dev, inference_state_device=dev, video_storage_device="cpu", dtype=self.dtype)

    # -- prompts ---------------------------------------------------------------------------
    def add_text(self, state: Any, frame_index: int, texts: list[str]) -> FrameResult:
        import torch

        with self.lock, torch.inference_mode():
            state = self.processor.add_text_prompt(inference_session=state, text=texts)
            out = self.net(inference_session=state, frame_idx=frame_index)
            return self._result(state, out, frame_index)

    def add_geometric(self, gstate: Any, frame_index: int, obj_id: int, prompt: VideoPrompt) -> FrameResult:
        """One object's box and/or points on a frame (they replace its inputs there); its mask on that frame."""
        import torch

        h, w = int(gstate.video_height), int(gstate.video_width)
        kw: dict[str, Any] = {}
        if prompt.box is not None:
            cx, cy, bw, bh = prompt.box
            kw["input_boxes"] = [[[(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]]]
        if prompt.points:
            kw["input_points"] = [[[[x * w, y * h] for x, y in prompt.points]]]
            kw["input_labels"] = [[list(prompt.labels)]]
        with self.lock, torch.inference_mode():
            self.tprocessor.add_inputs_to_inference_session(inference_session=gstate, frame_idx=frame_index, obj_ids=[obj_id], **kw)
            out = self.tnet(inference_session=gstate, frame_idx=frame_index)
            return self._geometric_result(out, h, w, only=obj_id)

    # -- propagation -----------------------------------------------------------------------
    def propagate(self, state: Any, gstate: Any, start: int, max_frames: int | None, reverse: bool) -> Iterator[FrameResult]:
        """Frames in processing order, each with the objects of both models (text, then box/point)."""
        import torch

        with self.lock, torch.inference_mode():
            runs = []
            if state is not None and state.prompts:
                runs.append(self._text_frames(state, start, max_frames, reverse))
            if gstate is not None and gstate.get_obj_num() > 0:
                runs.append(self._geometric_frames(gstate, start, max_frames, reverse))
            yield from merge_frames(runs, reverse)

    def _text_frames(self, state: Any, start: int, max_frames: int | None, reverse: bool) -> Iterator[FrameResult]:
        for out in self.net.propagate_in_video_iterator(inference_session=state, start_frame_idx=start, max_frame_num_to_track=max_frames, reverse=reverse):
            yield self._result(state, out, int(out.frame_idx))

    def _geometric_frames(self, gstate: Any, start: int, max_frames: int | None, reverse: bool) -> Iterator[FrameResult]:
        h, w = int(gstate.video_height), int(gstate.video_width)
        for out in self.tnet.propagate_in_video_iterator(inference_session=gstate, start_frame_idx=start, max_frame_num_to_track=max_frames, reverse=reverse):
            yield self._geometric_result(out, h, w)

    # -- objects -------------------------------------------------------------------------------
    def remove_object(self, state: Any, obj_id: int) -> None:
        with self.lock:
            state.remove_object(obj_id)

    def _result(self, state: Any, out: Any, frame_index: int) -> FrameResult:
        p = self.processor.postprocess_outputs(state, out)
        ids = [int(i) for i in _list(p.get("object_ids"))]
        masks = [np.asarray(m.cpu() if hasattr(m, "cpu") else m).astype(bool) for m in _list(p.get("masks"))]
        scores = [round(float(s), 6) for s in _list(p.get("scores"))]
        h, w = (masks[0].shape if masks else (1, 1))
        boxes = [_cxcywh_abs([float(v) for v in b], w, h) for b in _list(p.get("boxes"))]
        return FrameResult(frame_index, ids, masks, boxes, scores)

    def _geometric_result(self, out: Any, h: int, w: int, only: int | None = None) -> FrameResult:
        """The tracker's objects on a frame at the video's size. While propagating, an object whose
        mask is empty there (gone, hidden) is left out, as the text model does; the answer to
        a prompt always has its object."""
        masks = self.tprocessor.post_process_masks([out.pred_masks.float()], original_sizes=[[h, w]], binarize=True)[0][:, 0].cpu().numpy()
        scores = out.object_score_logits.float().sigmoid().flatten().tolist()
        fr = FrameResult(int(out.frame_idx), [], [], [], [])
        for oid, m, sc in zip(out.object_ids, masks, scores, strict=True):
            if (only is not None and oid != only) or (only is None and not m.any()):
                continue
            fr.obj_ids.append(int(oid))
            fr.masks.append(m)
            fr.boxes.append(_mask_box(m))
            fr.scores.append(round(float(sc), 6))
        return fr


def merge_frames(runs: list[Iterator[FrameResult]], reverse: bool) -> Iterator[FrameResult]:
    """Frames from several models' propagations, merged by frame index in processing order.

    Each run yields its frames in that order (ascending, or descending in reverse) but not
    always the same set (transformers' text model starts a reverse run one frame before the
    start, the tracker at it), so a frame is complete once no run can still yield it."""
    order = (lambda f: -f) if reverse else (lambda f: f)
    heads: list[FrameResult | None] = [next(r, None) for r in runs]
    while any(h is not None for h in heads):
        k = min(order(h.frame_index) for h in heads if h is not None)
        merged: FrameResult | None = None
        for i, h in enumerate(heads):
            if h is None or order(h.frame_index) != k:
                continue
            if merged is None:
                merged = h
            else:
                merged.obj_ids += h.obj_ids
                merged.masks += h.masks
                merged.boxes += h.boxes
                merged.scores += h.scores
            heads[i] = next(runs[i], None)
        assert merged is not None
        yield merged


def _same_module(a: Any, b: Any) -> bool:
    """Same class, same config (dtype aside) and same tensors: safe to use one for the other."""
    import torch

    ca, cb = ({k: v for k, v in m.config.to_dict().items() if k != "dtype"} for m in (a, b))
    if type(a) is not type(b) or ca != cb:
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def _list(v: Any) -> list[Any]:
    if v is None:
        return []
    return list(v)


def _cxcywh_abs(b: list[float], w: int, h: int) -> list[float]:
    x0, y0, x1, y1 = b
    return [round((x0 + x1) / 2 / w, 6), round((y0 + y1) / 2 / h, 6), round((x1 - x0) / w, 6), round((y1 - y0) / h, 6)]


def _mask_box(m: np.ndarray) -> list[float]:
    """A mask's bounding box as the text path gives it (torchvision's masks_to_boxes, then [cx, cy, w, h] normalised)."""
    h, w = m.shape
    ys, xs = np.nonzero(m)
    if not len(xs):
        return [0.0, 0.0, 0.0, 0.0]
    return _cxcywh_abs([float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())], w, h)
