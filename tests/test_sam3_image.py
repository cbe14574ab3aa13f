"""SAM3 image segmentation end to end: a tiny random-init checkpoint written by
`trifecta models tiny sam3 DIR`, loaded through the production `from_pretrained` path by
two real sam3 worker processes behind the real API, with the conftest Redis.

The weights are random, so the masks mean nothing; what is checked is everything around
them: both request shapes, prompt combination, RLE masks decoding to the image size,
boxes and scores, the per-image feature cache across requests and across two workers
(consistent-hash routing), jobs, and every kind of bad input.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from storage import codecs
from tasks.errors import Unprocessable
from tasks.routing import HashRing, image_key, pick_queue
from tasks.sam3 import parse_params
from tests.conftest import ROOT, fill_queue, photo, png_bytes, stopped, wait_depth, wait_drained
from workers.featcache import FeatureCache

MODEL_QUERIES = 16  # num_queries of the tiny checkpoint: every query passes confidence_threshold 0
B = 60.0


# ---------------------------------------------------------------- pure parts: routing, cache, prompts
class _W:
    def __init__(self, q: str, hb: float) -> None:
        self.queues, self.heartbeat = ["sam3", q], hb


def test_ring_is_stable_and_moves_few_keys() -> None:
    keys = [f"img-{i}" for i in range(2000)]
    two = HashRing(["sam3.a", "sam3.b"])
    three = HashRing(["sam3.a", "sam3.b", "sam3.c"])
    owners2 = [two.node_for(k) for k in keys]
    assert owners2 == [HashRing(["sam3.b", "sam3.a"]).node_for(k) for k in keys], "order of nodes must not matter"
    share = owners2.count("sam3.a") / len(keys)
    assert 0.3 < share < 0.7, share
    moved = [k for k, o in zip(keys, owners2, strict=True) if three.node_for(k) != o]
    assert all(three.node_for(k) == "sam3.c" for k in moved), "keys move only to the new node"
    assert 0.15 < len(moved) / len(keys) < 0.5
    assert HashRing([]).node_for("x") is None


def test_pick_queue_falls_back_to_shared_queue_when_owner_is_stale() -> None:
    now = 1000.0
    ws = [_W("sam3.a", now), _W("sam3.b", now)]
    k = next(f"k{i}" for i in range(100) if HashRing(["sam3.a", "sam3.b"]).node_for(f"k{i}") == "sam3.a")
    assert pick_queue(ws, k, model="sam3", stale_after_s=3, now=now) == "sam3.a"
    ws[0].heartbeat = now - 10  # a's heartbeat stopped: any live worker takes it from the shared queue
    assert pick_queue(ws, k, model="sam3", stale_after_s=3, now=now) == "sam3"
    assert pick_queue([], k, model="sam3", stale_after_s=3, now=now) == "sam3"


def test_feature_cache_bounds_entries_bytes_and_ttl() -> None:
    t = [0.0]
    c: FeatureCache[bytes] = FeatureCache(max_entries=3, max_bytes=100, ttl_s=10, size_of=len, clock=lambda: t[0])
    for k in "abc":
        assert c.put(k, b"x" * 30)
    assert c.get("a") == b"x" * 30  # a is now the most recent
    c.put("d", b"x" * 30)  # over 3 entries: b (least recently used) goes
    assert "b" not in c and len(c) == 3 and c.evictions == 1
    c.put("e", b"x" * 60)  # 90 + 60 > 100 bytes: evicts until it fits
    assert c.bytes <= 100 and "e" in c
    assert not c.put("huge", b"x" * 101) and "huge" not in c
    t[0] = 11.0
    assert c.get("e") is None and c.expired >= 1
    assert c.hits == 1 and c.stats()["entries"] == len(c)


@pytest.mark.parametrize(
    ("params", "msg"),
    [
        ({"prompts": []}, "empty"),
        ({"prompts": [{"type": "point", "point": [1, 2]}]}, "unknown type 'point'"),
        ({"prompts": [{"type": "box", "box": [0.5, 0.5, 1.4, 0.2]}]}, "outside [0, 1]"),
        ({"prompts": [{"type": "box", "box": [0.5, 0.5, 0.0, 0.2]}]}, "non-positive"),
        ({"prompts": [{"type": "box", "box": [0.9, 0.5, 0.4, 0.2]}]}, "reaches outside"),
        ({"prompts": [{"type": "box", "box": [0.5, 0.5, 0.2]}]}, "[cx, cy, w, h]"),
        ({"prompts": [{"type": "text", "text": "  "}]}, "non-empty"),
        ({"prompts": ["cat"] * 4}, "at most 3"),
        ({"prompts": ["cat"], "confidence_threshold": 2}, "between 0 and 1"),
        ({}, "needs prompts"),
    ],
)
def test_prompt_validation_messages(params: dict, msg: str) -> None:
    with pytest.raises(Unprocessable) as e:
        parse_params(params, max_prompts=3)
    assert msg in e.value.message


def test_prompts_combine_into_one_query_per_text() -> None:
    p = parse_params({"prompts": ["cat", {"type": "text", "text": "dog"}, {"type": "box", "box": [0.5, 0.5, 0.2, 0.2], "label": False}]}, max_prompts=8)
    qs = p.queries()
    assert [q.text for q in qs] == ["cat", "dog"] and all(len(q.boxes) == 1 and q.boxes[0].label is False for q in qs)
    only_box = parse_params({"prompts": [{"type": "box", "box": [0.5, 0.5, 0.2, 0.2]}]}, max_prompts=8).queries()
    assert [(q.text, q.is_text) for q in only_box] == [("visual", False)]


# ---------------------------------------------------------------- the tiny checkpoint
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sam3") / "tiny"
    r = subprocess.run([sys.executable, "-m", "client.cli", "models", "tiny", "sam3", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == str(out)
    return out


def test_tiny_checkpoint_loads_in_every_sam3_class(tiny: Path) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import Sam3Model, Sam3Processor, Sam3TrackerVideoModel, Sam3TrackerVideoProcessor, Sam3VideoModel, Sam3VideoProcessor

    saved = load_file(str(tiny / "model.safetensors"))
    patch_w = saved["detector_model.vision_encoder.backbone.embeddings.patch_embeddings.projection.weight"]
    for cls in (Sam3Model, Sam3VideoModel, Sam3TrackerVideoModel):
        m, info = cls.from_pretrained(str(tiny), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], (cls.__name__, info)
        enc = m.detector_model.vision_encoder if cls is Sam3VideoModel else m.vision_encoder
        assert torch.equal(enc.backbone.embeddings.patch_embeddings.projection.weight, patch_w), cls.__name__
    im = photo("coffee.png")
    for cls in (Sam3Processor, Sam3VideoProcessor, Sam3TrackerVideoProcessor):
        p = cls.from_pretrained(str(tiny))
        x = p(images=im, return_tensors="pt")
        assert tuple(x["pixel_values"].shape) == (1, 3, 112, 112), cls.__name__
        assert [int(v) for v in x["original_sizes"][0]] == [im.size[1], im.size[0]]
    ids = Sam3Processor.from_pretrained(str(tiny))(text=["a cat"], return_tensors="pt")["input_ids"]
    assert ids.shape == (1, 32) and int(ids[0, 0]) == 0 and int(ids[0, 6]) == 1  # <start> a _ c a t <end>


# ---------------------------------------------------------------- the stack: API + two sam3 workers
@pytest.fixture(scope="module")
def stack(make_stack, tiny: Path):
    return make_stack(models=["sam3", "sam3"], env={"SAM3_CHECKPOINT": str(tiny), "MAX_PROMPTS": "8", "MAX_BATCH_SIZE": "2", "INTRA_OP_THREADS": "1"})


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _segment(stack, data: bytes, prompts: list, threshold: float | None = 0.0) -> httpx.Response:
    body = {"image": _b64(data), "prompts": prompts}
    if threshold is not None:
        body["confidence_threshold"] = threshold
    return httpx.post(stack.url + "/api/v1/image/segment", json=body, timeout=B)


def _variant(seed: int) -> bytes:
    """A distinct image per seed (a crop of a real photo with a stamp), so each has its own hash."""
    im = photo("astronaut.png").resize((160 + seed, 120))
    a = np.asarray(im).copy()
    a[:4, :4] = seed % 256
    return png_bytes(Image.fromarray(a))


def _check_masks(body: dict, h: int, w: int) -> list[np.ndarray]:
    masks = [codecs.decode_rle(m) for m in body["masks"]]
    assert all(m.shape == (h, w) and m.dtype == bool for m in masks)
    assert all(m["size"] == [h, w] and isinstance(m["counts"], str) for m in body["masks"])
    for b in body["boxes"]:
        assert len(b) == 4 and all(0.0 <= v <= 1.0 for v in b) and b[2] >= 0 and b[3] >= 0
    return masks


def test_segment_json_text_prompt(stack) -> None:
    data = png_bytes(photo("chelsea.png"))
    r = _segment(stack, data, [{"type": "text", "text": "cat"}])
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"masks", "boxes", "scores", "num_masks", "image_size", "inference_time_ms"}
    assert body["image_size"] == {"width": 451, "height": 300}
    assert body["num_masks"] == len(body["masks"]) == len(body["boxes"]) == len(body["scores"]) == MODEL_QUERIES
    masks = _check_masks(body, 300, 451)
    assert body["scores"] == sorted(body["scores"], reverse=True) and all(0 < s < 1 for s in body["scores"])
    assert sum(int(m.sum()) for m in masks) > 0 and body["inference_time_ms"] > 0
    # a threshold above every score keeps nothing
    r = _segment(stack, data, [{"type": "text", "text": "cat"}], threshold=max(body["scores"]) + 1e-3)
    assert r.status_code == 200 and r.json()["num_masks"] == 0 and r.json()["masks"] == []


def test_segment_multipart_matches_json(stack) -> None:
    data = png_bytes(photo("coffee.png"))
    j = _segment(stack, data, [{"type": "text", "text": "a cup"}]).json()
    r = httpx.post(stack.url + "/api/v1/image/segment", files={"file": ("coffee.png", data, "image/png")}, data={"prompt": "a cup", "confidence_threshold": "0"}, timeout=B)
    assert r.status_code == 200, r.text
    f = r.json()
    assert f["num_objects"] == f["num_masks"] == j["num_masks"] == MODEL_QUERIES
    assert f["masks"] == j["masks"] and f["boxes"] == j["boxes"] and f["scores"] == j["scores"]
    assert f["image_size"] == {"width": 600, "height": 400}
    _check_masks(f, 400, 600)
    # the source service's form has no threshold: the default (IMAGE_MODEL_CONFIDENCE_THRESHOLD 0.5) applies
    d = httpx.post(stack.url + "/api/v1/image/segment", files={"file": ("c.png", data, "image/png")}, data={"prompt": "a cup"}, timeout=B).json()
    assert d["num_objects"] == sum(1 for s in f["scores"] if s > 0.5)


def test_combined_text_and_box_prompts(stack) -> None:
    data = png_bytes(photo("rocket.jpg"))
    text_only = _segment(stack, data, [{"type": "text", "text": "rocket"}]).json()
    boxes = [{"type": "box", "box": [0.5, 0.5, 0.3, 0.6], "label": True}, {"type": "box", "box": [0.15, 0.15, 0.1, 0.1], "label": False}]
    combined = _segment(stack, data, [{"type": "text", "text": "rocket"}, *boxes])
    assert combined.status_code == 200, combined.text
    c = combined.json()
    assert c["num_masks"] == MODEL_QUERIES
    assert c["scores"] != text_only["scores"], "box exemplars must change the query"
    negative_flipped = _segment(stack, data, [{"type": "text", "text": "rocket"}, boxes[0], {**boxes[1], "label": True}]).json()
    assert negative_flipped["scores"] != c["scores"], "a negative exemplar is not a positive one"
    box_only = _segment(stack, data, boxes).json()  # no text: the "visual" query
    assert box_only["num_masks"] == MODEL_QUERIES
    two_texts = _segment(stack, data, ["rocket", {"type": "text", "text": "tower"}, boxes[0]]).json()
    assert two_texts["num_masks"] == 2 * MODEL_QUERIES
    h, w = np.asarray(photo("rocket.jpg")).shape[:2]
    _check_masks(two_texts, h, w)


def test_cached_features_reuses_the_image_across_requests(stack) -> None:
    data = _variant(1)
    url = stack.url + "/api/v1/image/cached-features"
    r1 = httpx.post(url, json={"image": _b64(data), "text_prompts": ["person", "flag", "helmet"], "confidence_threshold": 0.0}, timeout=B)
    assert r1.status_code == 200, r1.text
    a = r1.json()
    assert set(a) == {"results", "cache_hit", "inference_time_ms"} and a["cache_hit"] is False
    assert [x["prompt"] for x in a["results"]] == ["person", "flag", "helmet"]
    for x in a["results"]:
        assert set(x) == {"prompt", "masks", "boxes", "scores", "num_masks"} and x["num_masks"] == MODEL_QUERIES
        _check_masks(x, 120, 161)
    r2 = httpx.post(url, json={"image": _b64(data), "text_prompts": ["suit", "person"], "confidence_threshold": 0.0}, timeout=B)
    b = r2.json()
    assert b["cache_hit"] is True, "new prompts on the same image reuse its features"
    assert r2.headers["x-worker"] == r1.headers["x-worker"]
    assert b["results"][1]["masks"] == a["results"][0]["masks"] and b["results"][1]["scores"] == a["results"][0]["scores"], "cached features give the same answer"
    # the segment endpoint shares the cache too
    s = _segment(stack, data, ["flag"])
    assert s.headers["x-cache-hit"] == "true" and s.json()["masks"] == a["results"][1]["masks"]


def test_cache_hits_across_two_workers(stack) -> None:
    """Each image goes to the worker the ring gives it; second requests are cache hits there."""
    names = [w.name for w in stack.workers if w.name.startswith("sam3")]
    assert len(names) == 2
    ring = HashRing([f"sam3.{n}" for n in names])
    found: dict[str, bytes] = {}
    for seed in range(10, 60):
        d = _variant(seed)
        found.setdefault(ring.node_for(image_key(d)) or "", d)
        if len(found) == 2:
            break
    assert len(found) == 2
    for queue, data in found.items():
        first = _segment(stack, data, ["astronaut"])
        second = _segment(stack, data, ["glove", "boot"])
        assert first.status_code == second.status_code == 200
        assert first.headers["x-queue"] == second.headers["x-queue"] == queue
        assert first.headers["x-worker"] == second.headers["x-worker"] == queue.split(".", 1)[1]
        assert first.headers["x-cache-hit"] == "false" and second.headers["x-cache-hit"] == "true"
    info = httpx.get(stack.url + "/models/info", timeout=5).json()["models"]["sam3"]
    assert info["live_workers"] == 2


def test_full_private_queue_answers_503_for_its_images_only(stack) -> None:
    """One worker's private queue at its share of MAX_QUEUE_DEPTH (64 over 2 workers: 32): images it
    owns get 503 with Retry-After and nothing is enqueued; images of the other worker are served.
    Both private queues full: the model is full (64) though its shared queue is empty."""
    names = sorted(w.name for w in stack.workers if w.name.startswith("sam3"))
    ring = HashRing([f"sam3.{n}" for n in names])
    owned: dict[str, bytes] = {}
    for seed in range(200, 260):
        d = _variant(seed)
        owned.setdefault(ring.node_for(image_key(d)) or "", d)
        if len(owned) == 2:
            break
    hot_q, cold_q = f"sam3.{names[0]}", f"sam3.{names[1]}"
    hot, cold = (next(w for w in stack.workers if w.name == n) for n in names)
    share = 64 // 2
    with stopped(stack, hot, "sam3"):
        fill_queue(stack.redis, hot_q, "sam3", share)
        wait_depth(stack.url, "sam3", share)  # the API's depth of sam3 counts the private queue
        jobs_before = len(stack.redis.keys("tf:job:*"))
        for path, body in (("/segment", {"prompts": ["astronaut"]}), ("/cached-features", {"text_prompts": ["astronaut"]})):
            r = httpx.post(stack.url + "/api/v1/image" + path, json={"image": _b64(owned[hot_q]), **body}, timeout=B)
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded"
            assert f"worker queue '{hot_q}' is full ({share} waiting" in r.json()["error"]["message"]
        assert stack.redis.llen(hot_q) == share and len(stack.redis.keys("tf:job:*")) == jobs_before  # nothing enqueued
        # the other worker's images, and the model as a whole (32 + 1 <= 64), still take work
        r = _segment(stack, owned[cold_q], ["astronaut"])
        assert r.status_code == 200, r.text
        assert r.headers["x-queue"] == cold_q and r.headers["x-worker"] == names[1]
        assert len(r.json()["masks"]) == MODEL_QUERIES
        with stopped(stack, cold, "sam3", fresh=False):  # briefly: no need to wait for its beat
            fill_queue(stack.redis, cold_q, "sam3", share)
            wait_depth(stack.url, "sam3", 2 * share)
            jobs_before = len(stack.redis.keys("tf:job:*"))
            job = httpx.post(stack.url + "/v1/jobs", json={"model": "sam3", "input": {"image": _b64(owned[cold_q])}, "params": {"prompts": ["astronaut"]}}, timeout=B)
            gate = httpx.post(stack.url + "/api/v1/image/segment", content=b"{never read", headers={"Content-Type": "application/json"}, timeout=B)
            for r in (job, gate):
                assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
                assert f"the 'sam3' queue is full ({2 * share} waiting, MAX_QUEUE_DEPTH=64)" in r.json()["error"]["message"]
            assert stack.redis.llen("sam3") == 0 and len(stack.redis.keys("tf:job:*")) == jobs_before
    wait_drained(stack.redis, hot_q)  # the resumed workers skip the placeholders (no job record)
    wait_drained(stack.redis, cold_q)
    wait_depth(stack.url, "sam3", at_most=0)  # the API's own view, which its next poll brings down
    r = _segment(stack, owned[hot_q], ["astronaut"])
    assert r.status_code == 200 and r.headers["x-worker"] == names[0], r.text


def test_job_writes_instances_and_union_mask(stack) -> None:
    data = png_bytes(photo("chelsea.png"))
    r = httpx.post(
        stack.url + "/v1/jobs",
        json={"model": "sam3", "input": {"image": _b64(data)}, "params": {"prompts": [{"type": "text", "text": "cat"}], "confidence_threshold": 0.0, "format": "png"}},
        timeout=B,
    )
    assert r.status_code == 202, r.text
    job = r.json()["job_id"]
    t_end = time.time() + B
    while time.time() < t_end:
        st = httpx.get(stack.url + f"/v1/jobs/{job}", timeout=5).json()
        if st["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.2)
    assert st["status"] == "succeeded", st
    outs = {o["key"]: o for o in st["result"]["outputs"]}
    assert set(outs) == {"mask", "instances.json"} and outs["mask"]["format"] == "png"
    union = codecs.decode_png(httpx.get(stack.url + f"/v1/jobs/{job}/result?key=mask", timeout=10).content)
    inst = httpx.get(stack.url + f"/v1/jobs/{job}/result?key=instances.json", timeout=10).json()
    masks = [codecs.decode_rle(m) for m in inst["results"][0]["masks"]]
    assert union.shape == (300, 451) and len(masks) == MODEL_QUERIES
    assert (union == np.logical_or.reduce(masks)).all()
    assert st["result"]["meta"]["num_masks"] == MODEL_QUERIES
    # a bad prompt in a job fails the job with the same 422 code the sync endpoints give
    r = httpx.post(stack.url + "/v1/jobs", json={"model": "sam3", "input": {"image": _b64(data)}, "params": {"prompts": [{"type": "circle"}]}}, timeout=B)
    bad = r.json()["job_id"]
    t_end = time.time() + B
    while time.time() < t_end and (st := httpx.get(stack.url + f"/v1/jobs/{bad}", timeout=5).json())["status"] not in ("succeeded", "failed"):
        time.sleep(0.2)
    assert st["status"] == "failed" and st["error"]["code"] == "unprocessable" and "unknown type" in st["error"]["message"]


@pytest.mark.parametrize(
    ("body", "msg"),
    [
        ({"prompts": []}, "empty"),
        ({"prompts": [{"type": "polygon", "points": []}]}, "unknown type"),
        ({"prompts": [{"type": "box", "box": [0.5, 0.5, 1.5, 0.1]}]}, "outside [0, 1]"),
        ({"prompts": [{"type": "box", "box": [0.5, 0.5, 0.2, -0.1]}]}, "outside [0, 1]"),
        ({"prompts": [{"type": "box", "box": [0.5, 0.5, 0.2, 0.0]}]}, "non-positive"),
        ({"prompts": ["cat"] * 9}, "MAX_PROMPTS"),
        ({"prompts": ["cat"], "image": "!!not base64!!"}, "not valid base64"),
        ({"prompts": ["cat"], "confidence_threshold": -1}, "between 0 and 1"),
        ({"image": None, "prompts": ["cat"]}, "base64"),
    ],
)
def test_bad_input_is_422(stack, body: dict, msg: str) -> None:
    full = {"image": _b64(png_bytes(photo("coffee.png").resize((64, 48)))), **body}
    r = httpx.post(stack.url + "/api/v1/image/segment", json=full, timeout=B)
    assert r.status_code == 422, r.text
    assert msg in r.json()["error"]["message"]


def test_bad_input_other_shapes_and_service_still_answers(stack) -> None:
    url = stack.url + "/api/v1/image"
    small = png_bytes(photo("coffee.png").resize((64, 48)))
    r = httpx.post(url + "/cached-features", json={"image": _b64(small), "text_prompts": []}, timeout=B)
    assert r.status_code == 422 and "empty" in r.json()["error"]["message"]
    r = httpx.post(url + "/cached-features", json={"image": _b64(small), "text_prompts": [{"type": "text"}]}, timeout=B)
    assert r.status_code == 422 and "list of strings" in r.json()["error"]["message"]
    r = httpx.post(url + "/segment", files={"file": ("x.png", small, "image/png")}, data={"prompt": " "}, timeout=B)
    assert r.status_code == 422 and "non-empty" in r.json()["error"]["message"]
    r = httpx.post(url + "/segment", files={"file": ("x.png", small, "image/png")}, timeout=B)
    assert r.status_code == 422 and "prompt" in r.json()["error"]["message"]
    r = httpx.post(url + "/segment", json={"image": _b64(b"not an image at all"), "prompts": ["cat"]}, timeout=B)
    assert r.status_code == 415
    r = httpx.post(url + "/segment", content=b"{", headers={"Content-Type": "application/json"}, timeout=B)
    assert r.status_code == 422
    ok = _segment(stack, small, ["cup"])
    assert ok.status_code == 200 and ok.json()["image_size"] == {"width": 64, "height": 48}


def test_owner_gone_requests_move_to_the_other_worker(stack) -> None:
    """Kill the worker holding an image's features: its next request is served by the other one."""
    data = _variant(99)
    first = _segment(stack, data, ["astronaut"])
    owner = first.headers["x-worker"]
    victim = next(w for w in stack.workers if w.name == owner)
    victim.kill()
    t_end = time.time() + 20
    while time.time() < t_end and owner in httpx.get(stack.url + "/health", timeout=5).json()["queues"].get("sam3", {}).get("workers", []):
        time.sleep(0.2)
    r = _segment(stack, data, ["astronaut"])
    assert r.status_code == 200, r.text
    assert r.headers["x-worker"] != owner and r.headers["x-cache-hit"] == "false"
    assert r.json()["masks"] == first.json()["masks"], "the same checkpoint gives the same answer on either worker"


def test_offline_start_falls_back_to_the_tiny_checkpoint(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`trifecta up` with MODELS=sam3 and no hub: the ensure hook points SAM3_CHECKPOINT at a tiny checkpoint, loudly."""
    import shutil

    from tasks.settings import Settings
    from workers.tiny import ensure_model

    shutil.copytree(tiny, tmp_path / "sam3-tiny")  # already written: the hook reuses it instead of writing another
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SAM3_CHECKPOINT", "facebook/sam3")
    s = Settings(model_dir=str(tmp_path), hf_local_files_only=True, sam3_checkpoint="facebook/sam3-not-cached-here")
    msg = ensure_model("sam3", s)
    assert msg == f"sam3: UNTRAINED tiny random-init checkpoint at {tmp_path / 'sam3-tiny'}"
    assert os.environ["SAM3_CHECKPOINT"] == str(tmp_path / "sam3-tiny")
    assert "UNTRAINED tiny random-init SAM3" in capsys.readouterr().out
    assert ensure_model("sam3", Settings(sam3_checkpoint=str(tiny))) == f"sam3: local checkpoint {tiny}"
