"""The SAM3 prompt contract, shared by the API and the worker.

The API answers 422 before the queue; the worker makes the same checks for `/v1/jobs` and
shard jobs, whose params reach it unchecked.

A request's `params`:

    {"prompts": [{"type": "text", "text": "person"},
                 {"type": "box", "box": [cx, cy, w, h], "label": true}],   # normalised, label false = negative
     "confidence_threshold": 0.5}                                         # optional

A bare string in `prompts` is a text prompt, and `{"prompt": "cat"}` is short for one.
Each text prompt is one query; boxes are exemplars shared by every query (positive or
negative). With boxes and no text the query is the processor's "visual" prompt. A query's
result is `{"prompt", "masks" (COCO RLE), "boxes" ([cx, cy, w, h] normalised), "scores",
"num_masks"}`; the worker writes all of them as one JSON output, `RESULT_KEY`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from tasks.errors import Unprocessable, shown

MODEL = "sam3"
RESULT_KEY = "instances.json"  # the worker's output holding every query's RLE masks, boxes and scores
VISUAL_PROMPT = "visual"  # the text Sam3Processor uses for a box-only query
MAX_TEXT_CHARS = 200
EDGE_TOLERANCE = 1e-3  # boxes computed by clients in float may overshoot an edge by a rounding error


@dataclass(frozen=True)
class Box:
    cx: float
    cy: float
    w: float
    h: float
    label: bool = True

    def as_list(self) -> list[float]:
        return [self.cx, self.cy, self.w, self.h]


@dataclass(frozen=True)
class Query:
    """One model query: a text (or "visual") with the request's box exemplars."""

    text: str
    boxes: tuple[Box, ...] = field(default_factory=tuple)
    is_text: bool = True


@dataclass(frozen=True)
class Sam3Params:
    texts: tuple[str, ...]
    boxes: tuple[Box, ...]
    confidence_threshold: float | None

    def queries(self) -> list[Query]:
        if self.texts:
            return [Query(t, self.boxes, True) for t in self.texts]
        return [Query(VISUAL_PROMPT, self.boxes, False)]


def is_finite_number(v: Any) -> bool:
    """A JSON number (not a bool) that is a finite float: what every prompt coordinate must be."""
    try:
        return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(float(v))
    except OverflowError:  # an integer past float's range
        return False


def _number(v: Any, where: str) -> float:
    if not is_finite_number(v):
        raise Unprocessable(f"{where} must be a finite number, got {shown(v)}")
    return float(v)


def _text(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise Unprocessable(f"{where} must be a non-empty string")
    v = " ".join(v.split())
    if len(v) > MAX_TEXT_CHARS:
        raise Unprocessable(f"{where} is {len(v)} characters; at most {MAX_TEXT_CHARS}")
    return v


def parse_box(raw: Any, label: Any = True, where: str = "box") -> Box:
    if not isinstance(raw, (list, tuple)) or len(raw) != 4:
        raise Unprocessable(f"{where} must be [cx, cy, w, h] (4 numbers normalised to [0, 1]), got {shown(raw)}")
    cx, cy, w, h = (_number(x, where) for x in raw)
    if not all(0.0 <= x <= 1.0 for x in (cx, cy, w, h)):
        raise Unprocessable(f"{where} {shown(list(raw))} has a value outside [0, 1]; boxes are [cx, cy, w, h] normalised by the image width and height")
    if w <= 0 or h <= 0:
        raise Unprocessable(f"{where} {shown(list(raw))} has a non-positive width or height")
    t = EDGE_TOLERANCE
    if cx - w / 2 < -t or cy - h / 2 < -t or cx + w / 2 > 1 + t or cy + h / 2 > 1 + t:
        raise Unprocessable(f"{where} {shown(list(raw))} reaches outside the image ([0, 1]); [cx, cy, w, h] is centre and size")
    if not isinstance(label, bool):
        raise Unprocessable(f"{where.rsplit('.', 1)[0]}.label must be true (positive exemplar) or false (negative), got {shown(label)}")
    return Box(cx, cy, w, h, label)


def parse_prompts(raw: Any, *, max_prompts: int, where: str = "prompts") -> tuple[tuple[str, ...], tuple[Box, ...]]:
    """Text prompts and boxes from a list of prompt objects; raises Unprocessable (422) with a clear message."""
    if not isinstance(raw, list):
        raise Unprocessable(f'{where} must be a list of prompts like {{"type": "text", "text": "person"}}')
    if not raw:
        raise Unprocessable(f"{where} is empty; give at least one text or box prompt")
    if len(raw) > max_prompts:
        raise Unprocessable(f"{where} has {len(raw)} prompts; at most {max_prompts} are accepted (MAX_PROMPTS)")
    texts: list[str] = []
    boxes: list[Box] = []
    for i, p in enumerate(raw):
        here = f"{where}[{i}]"
        if isinstance(p, str):
            texts.append(_text(p, here))
            continue
        if not isinstance(p, dict):
            raise Unprocessable(f"{here} must be an object with a `type` (text or box)")
        kind = p.get("type")
        if kind == "text":
            texts.append(_text(p.get("text"), f"{here}.text"))
        elif kind == "box":
            boxes.append(parse_box(p.get("box"), p.get("label", True), f"{here}.box"))
        else:
            raise Unprocessable(f"{here} has unknown type {shown(kind)}; known prompt types: text, box")
    return tuple(texts), tuple(boxes)


def parse_threshold(v: Any, where: str = "confidence_threshold") -> float | None:
    if v is None:
        return None
    x = _number(v, where)
    if not 0.0 <= x <= 1.0:
        raise Unprocessable(f"{where} must be between 0 and 1, got {x}")
    return x


def parse_params(params: dict[str, Any], *, max_prompts: int) -> Sam3Params:
    """The worker's reading of a request's params (also used by the API before enqueueing)."""
    if "prompts" in params:
        raw = params["prompts"]
    elif "prompt" in params:
        raw = [params["prompt"]]
    elif "text_prompts" in params:
        raw = params["text_prompts"]
        if isinstance(raw, list) and not all(isinstance(t, str) for t in raw):
            raise Unprocessable("text_prompts must be a list of strings")
    else:
        raise Unprocessable('sam3 needs prompts: params {"prompts": [{"type": "text", "text": "person"}]}')
    texts, boxes = parse_prompts(raw, max_prompts=max_prompts)
    return Sam3Params(texts, boxes, parse_threshold(params.get("confidence_threshold")))


def prompts_param(p: Sam3Params) -> list[dict[str, Any]]:
    """Params back to the wire shape (the API sends the normalised form)."""
    out: list[dict[str, Any]] = [{"type": "text", "text": t} for t in p.texts]
    out += [{"type": "box", "box": b.as_list(), "label": b.label} for b in p.boxes]
    return out
