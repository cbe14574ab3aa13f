"""Mask2Former end to end: API → Redis → a real mask2former worker (tiny random-init checkpoint with
ADE20K's 150 label names, written by `trifecta models tiny mask2former`) → storage.

The source contract (`/segment`, `/segment-batch`, `X-Mask`, `X-Model: mask2former_ade20k`), the
one-inference guarantee (counted model forwards), label validation, EXIF, HEIC, size limits, and
`classes=all` jobs with a label map.
"""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import time

import httpx
import numpy as np
import orjson
import pytest
from PIL import Image

from storage import codecs
from tests.conftest import ROOT, fill_queue, photo, png_bytes, redis_paused, stopped, wait_depth, wait_drained

MAX_PIXELS = 200_000  # M2F_MAX_PIXELS of this stack: chelsea (451x300) fits, 600x400 does not


@pytest.fixture(scope="module")
def stack(make_stack, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("ckpt") / "mask2former"
    subprocess.run([sys.executable, "-m", "client.cli", "models", "tiny", "mask2former", str(out)], check=True, cwd=ROOT, capture_output=True)
    return make_stack(models=["mask2former"], env={"M2F_CHECKPOINT": str(out), "M2F_LONG_SIDE": "256", "M2F_MAX_PIXELS": str(MAX_PIXELS)})


def worker_counts(stack) -> tuple[int, int]:
    """(requests processed, model forwards) as the worker last registered them."""
    raw = stack.redis.hgetall(f"tf:worker:{stack.workers[0].name}")
    return int(raw[b"processed"]), int(orjson.loads(raw[b"info"])["forwards"])


def counts_after(stack, processed: int, timeout: float = 10) -> tuple[int, int]:
    t_end = time.time() + timeout
    while time.time() < t_end:
        p, f = worker_counts(stack)
        if p >= processed:
            return p, f
        time.sleep(0.1)
    raise AssertionError("the worker's registration did not catch up")


def seg_batch(stack, data: bytes, **kw) -> httpx.Response:
    headers = {"Content-Type": "image/png", **kw.pop("headers", {})}
    return httpx.post(stack.url + "/segment-batch", content=data, headers=headers, timeout=60, **kw)


def decode_all(body: dict) -> dict[str, np.ndarray]:
    return {k: codecs.decode_png(base64.b64decode(v)) for k, v in body.items()}


def test_segment_batch_is_one_inference_and_matches_four_segment_calls(stack) -> None:
    data = png_bytes(photo("chelsea.png"))
    p0, f0 = worker_counts(stack)
    r = seg_batch(stack, data, headers={"X-Model": "mask2former_ade20k"})
    assert r.status_code == 200, r.text
    masks = decode_all(r.json())
    assert list(masks) == ["wall", "floor", "ceiling", "window"]
    assert all(m.shape == (300, 451) for m in masks.values())
    stacked = np.stack(list(masks.values())).astype(int)
    assert stacked.sum(0).max() <= 1, "a pixel has one class"
    assert all(m.any() for m in masks.values()), "the tiny checkpoint puts each default class somewhere"
    p1, f1 = counts_after(stack, p0 + 1)
    assert (p1 - p0, f1 - f0) == (1, 1), "four masks from ONE model call"
    # the source client's four calls: the same masks, four model calls
    for name, want in masks.items():
        r = httpx.post(stack.url + "/segment", content=data, headers={"Content-Type": "image/png", "X-Mask": name}, timeout=60)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.headers["x-class-label"] == ("windowpane" if name == "window" else name)
        assert (codecs.decode_png(r.content) == want).all()
    p2, f2 = counts_after(stack, p1 + 4)
    assert f2 - f1 == 4


def test_any_label_names_and_422_listing_the_valid_ones(stack) -> None:
    data = png_bytes(photo("chelsea.png"))
    all_masks = decode_all(seg_batch(stack, data, params={"classes": "all"}).json())
    present = [k for k in all_masks if k not in ("wall", "floor", "ceiling", "windowpane")]
    assert present, "the tiny model also predicts some other class"
    other = present[0]
    r = seg_batch(stack, data, headers={"X-Classes": f"windowpane,{other}"})
    assert r.status_code == 200 and list(r.json()) == ["windowpane", other]
    got = decode_all(r.json())
    assert (got[other] == all_masks[other]).all() and (got["windowpane"] == all_masks["windowpane"]).all()
    cover = np.stack(list(all_masks.values())).astype(int).sum(0)
    assert (cover == 1).all(), "classes=all: every pixel in exactly one mask"
    r = seg_batch(stack, data, params={"classes": "wall,sofa,unicorn"})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["unknown"] == ["unicorn"] and "windowpane" in err["valid"] and len(err["valid"]) == 150 and "window = windowpane" in err["message"]
    r = httpx.post(stack.url + "/segment", content=data, headers={"Content-Type": "image/png", "X-Mask": "unicorn"}, timeout=30)
    assert r.status_code == 422 and "unicorn" in r.json()["error"]["message"]
    r = seg_batch(stack, data, headers={"X-Model": "sam9"})
    assert r.status_code == 404 and "mask2former_ade20k" in r.json()["error"]["message"]
    assert seg_batch(stack, data).status_code == 200


def test_exif_orientation_heic_and_size_limits(stack) -> None:
    im = photo("chelsea.png")
    # the same pixels stored sideways with an EXIF orientation tag, and stored upright
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    sideways = png_bytes(im.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())
    from PIL import ImageOps

    upright = png_bytes(ImageOps.exif_transpose(Image.open(io.BytesIO(sideways))))
    a = decode_all(seg_batch(stack, sideways, headers={"Content-Type": "image/jpeg"}).json())
    b = decode_all(seg_batch(stack, upright).json())
    assert a["wall"].shape == (300, 451)
    assert all((a[k] == b[k]).all() for k in a)
    import pillow_heif

    pillow_heif.register_heif_opener()
    heic = png_bytes(im, "HEIF", quality=90)
    r = seg_batch(stack, heic, headers={"Content-Type": "image/heic"})
    assert r.status_code == 200 and decode_all(r.json())["floor"].shape == (300, 451)
    big = png_bytes(Image.new("RGB", (600, 400), (90, 120, 30)))
    r = seg_batch(stack, big)
    assert r.status_code == 422 and "M2F_MAX_PIXELS" in r.json()["error"]["message"] and "Downscale" in r.json()["error"]["message"]
    r = seg_batch(stack, b"not an image")
    assert r.status_code == 415
    ref = seg_batch(stack, png_bytes(im))
    assert ref.status_code == 200
    # no Content-Type (or curl's form default for --data-binary) is a raw body: the image is sniffed
    for headers in ({}, {"Content-Type": "application/x-www-form-urlencoded"}):
        r = httpx.post(stack.url + "/segment-batch", content=png_bytes(im), headers=headers, timeout=60)
        assert r.status_code == 200 and r.request.headers.get("content-type") == headers.get("Content-Type"), r.text
        assert r.headers["x-model-untrained"] == "true"  # the tiny random-init checkpoint
        got, want = decode_all(r.json()), decode_all(ref.json())
        assert set(got) == set(want) and all((got[k] == want[k]).all() for k in want)
    # a wrong explicit type is still refused, and the service answers afterwards
    r = httpx.post(stack.url + "/segment-batch", content=png_bytes(im), headers={"Content-Type": "text/plain"}, timeout=60)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    assert seg_batch(stack, png_bytes(im)).status_code == 200


def test_full_queue_answers_503_before_the_body_and_without_redis(stack) -> None:
    """The mask2former queue at MAX_QUEUE_DEPTH: /segment and /segment-batch answer 503 from the
    admission gate, before routing (a body that is not an image, or a Content-Type the route
    would refuse, gets it too: neither is looked at), a job from its route, all while Redis
    answers nobody; nothing is enqueued. An unknown X-Model is still the route's 404."""
    from tasks.settings import Settings

    depth = Settings.model_fields["max_queue_depth"].default  # this stack's MAX_QUEUE_DEPTH
    data = png_bytes(photo("chelsea.png"))
    png = {"Content-Type": "image/png"}
    job = {"model": "mask2former", "input": {"image": base64.b64encode(data).decode()}, "params": {"format": "png"}}
    with stopped(stack, stack.workers[0], "mask2former"):
        fill_queue(stack.redis, "mask2former", "mask2former", depth)
        wait_depth(stack.url, "mask2former", depth)
        jobs_before = len(stack.redis.keys("tf:job:*"))
        with redis_paused(stack.redis, 2.0) as until:
            rs = [
                httpx.post(stack.url + "/segment", content=data, headers={**png, "X-Mask": "wall"}, timeout=10),
                httpx.post(stack.url + "/segment?model=mask2former_ade20k", content=b"not an image", headers=png, timeout=10),
                # decided before the route looks at anything: the route itself would answer 415
                httpx.post(stack.url + "/segment", content=b"plain text", headers={"Content-Type": "text/plain"}, timeout=10),
                seg_batch(stack, data, headers={"X-Model": "mask2former_ade20k"}),
                httpx.post(stack.url + "/v1/jobs", json=job, timeout=10),
            ]
            unknown = seg_batch(stack, data, headers={"X-Model": "sam9"})
            assert time.monotonic() < until, "answered only after Redis did"
        for r in rs:
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded"
            assert f"the 'mask2former' queue is full ({depth} waiting, MAX_QUEUE_DEPTH={depth})" in r.json()["error"]["message"]
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_model"
        assert stack.redis.llen("mask2former") == depth and len(stack.redis.keys("tf:job:*")) == jobs_before
    wait_drained(stack.redis, "mask2former")
    wait_depth(stack.url, "mask2former", at_most=0)  # the API's own view, which its next poll brings down
    r = httpx.post(stack.url + "/segment", content=data, headers={**png, "X-Mask": "wall"}, timeout=30)
    assert r.status_code == 200 and codecs.decode_png(r.content).shape == (300, 451), r.text


def test_job_with_all_classes_writes_masks_and_a_label_map(stack) -> None:
    data = png_bytes(photo("coffee.png").crop((0, 0, 440, 400)))  # under this stack's M2F_MAX_PIXELS
    r = httpx.post(stack.url + "/v1/jobs", json={"model": "mask2former", "input": {"image": base64.b64encode(data).decode()}, "params": {"classes": "all", "format": "png"}}, timeout=30)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    t_end = time.time() + 60
    while (j := httpx.get(f"{stack.url}/v1/jobs/{job_id}", timeout=5).json())["status"] not in ("succeeded", "failed"):
        assert time.time() < t_end
        time.sleep(0.1)
    assert j["status"] == "succeeded", j
    outs = {o["key"]: o for o in j["result"]["outputs"]}
    classes = j["result"]["meta"]["classes"]
    assert set(outs) == {c["key"] for c in classes} | {"labels.png"} and len(classes) >= 2
    labels = np.asarray(Image.open(io.BytesIO(httpx.get(f"{stack.url}/v1/jobs/{job_id}/result", params={"key": "labels.png"}, timeout=10).content)))
    assert labels.shape == (400, 440)
    for c in classes:
        m = codecs.decode_png(httpx.get(f"{stack.url}/v1/jobs/{job_id}/result", params={"key": c["key"]}, timeout=10).content)
        assert (m == (labels == c["id"])).all() and int(m.sum()) == c["pixels"] > 0
    assert sum(c["pixels"] for c in classes) == 400 * 440
    # a job asking for an unknown class fails with the list of valid names
    r = httpx.post(stack.url + "/v1/jobs", json={"model": "mask2former", "input": {"image": base64.b64encode(data).decode()}, "params": {"classes": ["wall", "unicorn"]}}, timeout=30)
    job_id = r.json()["job_id"]
    while (j := httpx.get(f"{stack.url}/v1/jobs/{job_id}", timeout=5).json())["status"] not in ("succeeded", "failed"):
        time.sleep(0.1)
    assert j["status"] == "failed" and j["error"]["code"] == "unprocessable" and "unicorn" in j["error"]["message"]


@pytest.mark.parametrize("threads", [1, 2])
def test_full_size_labels_equal_the_processors_resize_and_argmax(monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    """The memory-bounded upsampling (classes one chunk at a time, classes that cannot win
    skipped) gives exactly `post_process_semantic_segmentation`'s resize of all C classes to
    H x W followed by argmax: near-ties included, every chunk size, one thread and two."""
    import torch
    import torch.nn.functional as F

    from workers.runners import mask2former as m2f

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    base = torch.rand(150, 48, 48, generator=g) * 0.2
    base[:6] += torch.rand(6, 48, 48, generator=g)  # a few strong classes, as a trained model gives
    base[7] = base[:6].max(0).values - 1e-7 * torch.rand(48, 48, generator=g)  # almost ties everywhere
    base[9] = base[2]  # exact ties with class 2 everywhere: the lower id wins, as argmax
    scores = F.interpolate(base[None], size=(384, 384), mode="bilinear", align_corners=False)[0]
    for H, W in [(300, 451), (37, 29), (1000, 357), (61, 60), (70, 60)]:
        ref = F.interpolate(scores[None], size=(H, W), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
        for per in (1, 2, 3, 5, 150):
            monkeypatch.setattr(m2f, "BAND_BYTES", per * H * W * 4)
            got = m2f.upsample_labels(scores, (H, W))
            assert got.shape == (H, W) and got.dtype == np.uint8
            assert (got == ref).all(), (H, W, per, int((got != ref).sum()))
    assert len(m2f._candidates(scores)) < 150, "classes that cannot win are skipped"
