"""V-JEPA 2 end to end: API → Redis → a real vjepa2 worker (tiny random-init checkpoint written by
`trifecta models tiny vjepa2`, loaded through `from_pretrained`) → storage.

Source contract (`POST /api/v1/infer`, `GET /`), frame validation (422s), video jobs (PyAV-written
video, chunked decode, timeline in storage), frames jobs with a signed callback, offline fallback.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, fill_queue, make_bucket, redis_paused, stopped, wait_depth, wait_drained, wait_job
from tests.helpers.clips import FPS, N_FRAMES, H, W, frames_rgb, png, write_video
from tests.helpers.stacks import tiny_checkpoint

SECRET = "s3cret"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint("vjepa2", tmp_path_factory.mktemp("ckpt") / "vjepa2")


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("videos")


class _Catcher(BaseHTTPRequestHandler):
    got: list[tuple[dict, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Catcher.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a: object) -> None:
        pass


@pytest.fixture(scope="module")
def receiver():
    """A webhook receiver on a local port (the operator allows it by host:port)."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Catcher)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()


@pytest.fixture(scope="module")
def stack(make_stack, ckpt: Path, video_dir: Path, receiver):
    env = {
        "VJEPA2_CHECKPOINT": str(ckpt), "VIDEO_CHUNK_CLIPS": "2", "ALLOWED_INPUT_ROOTS": str(video_dir), "MAX_BATCH_SIZE": "4",
        "WEBHOOK_SECRET": SECRET, "WEBHOOK_ALLOWED_HOSTS": f"127.0.0.1:{receiver.server_port}",
    }
    return make_stack(models=["vjepa2"], env=env)


@pytest.fixture(scope="module")
def oracle(ckpt: Path):
    """The project's own runner in this process, on the same checkpoint: the reference answers."""
    from tasks.settings import Settings
    from workers.device import Device
    from workers.runners.vjepa2 import VJEPA2Runner

    r = VJEPA2Runner("vjepa2", Settings(vjepa2_checkpoint=str(ckpt)), Device("cpu", 0, None, 1))
    r.load()
    return r


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def infer(stack, body: dict) -> httpx.Response:
    return httpx.post(stack.url + "/api/v1/infer", json=body, timeout=60)


def same_predictions(a: list[dict], b: list[dict], tol: float = 2e-4) -> None:
    """Equal top-k up to float noise of a different batch composition."""
    assert len(a) == len(b)
    da, db = {p["label"]: p["confidence"] for p in a}, {p["label"]: p["confidence"] for p in b}
    for lbl in set(da) & set(db):
        assert abs(da[lbl] - db[lbl]) <= tol, (a, b)
    for x, y in zip(a, b, strict=True):  # labels may swap only where their confidences tie
        if x["label"] != y["label"]:
            assert abs(x["confidence"] - y["confidence"]) <= tol, (a, b)


# ---------------------------------------------------------------- /api/v1/infer
def test_infer_contract_and_channel_orders_agree(stack) -> None:
    fr = frames_rgb(1)
    r = infer(stack, {"frames": [b64(f[:, :, ::-1].tobytes()) for f in fr], "width": W, "height": H, "format": "BGR"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"predictions", "clip_id"}
    assert str(uuid.UUID(body["clip_id"])) == body["clip_id"] and body["clip_id"].replace("-", "") == r.headers["x-job-id"]
    preds = body["predictions"]
    assert len(preds) == 5
    from workers.runners.vjepa2 import TINY_LABELS

    assert all(p["label"] in TINY_LABELS for p in preds) and len({p["label"] for p in preds}) == 5
    conf = [p["confidence"] for p in preds]
    assert conf == sorted(conf, reverse=True) and 0 < sum(conf) <= 1.0 + 1e-6
    # the same pixels as raw RGB and as PNG frames give the same answer (BGR is swapped, PNG decoded losslessly)
    rgb = infer(stack, {"frames": [b64(f.tobytes()) for f in fr], "width": W, "height": H, "format": "RGB"}).json()["predictions"]
    pngs = infer(stack, {"frames": [b64(png(f)) for f in fr], "width": W, "height": H, "format": "RGB"}).json()["predictions"]
    assert rgb == preds and pngs == preds
    # different frames give a different answer: the frames reach the model
    other = infer(stack, {"frames": [b64(f.tobytes()) for f in frames_rgb(2)], "width": W, "height": H, "format": "RGB"}).json()["predictions"]
    assert other != preds


def test_infer_rejects_bad_clips_with_422_and_keeps_answering(stack) -> None:
    fr = [f.tobytes() for f in frames_rgb(3)]
    ok = {"frames": [b64(f) for f in fr], "width": W, "height": H, "format": "RGB"}
    r = infer(stack, {**ok, "frames": ok["frames"][:15]})
    assert r.status_code == 422 and "got 15 frames" in r.json()["error"]["message"] and "16" in r.json()["error"]["message"]
    r = infer(stack, {**ok, "frames": [*ok["frames"][:15], b64(fr[0][:-3])]})
    assert r.status_code == 422 and "frame 15" in r.json()["error"]["message"]
    small = png(np.zeros((H // 2, W // 2, 3), np.uint8))
    r = infer(stack, {**ok, "frames": [*ok["frames"][:15], b64(small)]})
    assert r.status_code == 422 and f"frame 15 is {W // 2}x{H // 2}; the request says {W}x{H}" in r.json()["error"]["message"]
    r = infer(stack, {**ok, "format": "YUV"})
    assert r.status_code == 422
    r = infer(stack, {**ok, "frames": ["not base64!!", *ok["frames"][1:]]})
    assert r.status_code == 422 and "frame 0 is not valid base64" in r.json()["error"]["message"]
    # a JPEG whose header is fine but whose data is cut: found by the worker, still a 422
    bio = io.BytesIO()
    Image.fromarray(frames_rgb(4)[0]).save(bio, format="JPEG", quality=90)
    cut = bio.getvalue()[: len(bio.getvalue()) // 3]
    r = infer(stack, {**ok, "frames": [b64(cut), *ok["frames"][1:]]})
    assert r.status_code == 422 and "frame 0 could not be decoded" in r.json()["error"]["message"], r.text
    assert infer(stack, ok).status_code == 200


def test_full_queue_answers_503_before_the_body_and_without_redis(stack) -> None:
    """The vjepa2 queue at MAX_QUEUE_DEPTH: /api/v1/infer answers 503 from the admission gate,
    before routing (a body that is not JSON, or a Content-Type the route would refuse, gets it
    too: neither is looked at), and a frames job from its route, all while Redis answers
    nobody; nothing is enqueued."""
    from tasks.settings import Settings

    depth = Settings.model_fields["max_queue_depth"].default  # this stack's MAX_QUEUE_DEPTH
    ok = {"frames": [b64(f.tobytes()) for f in frames_rgb(5)], "width": W, "height": H, "format": "RGB"}
    job = {"model": "vjepa2", "input": ok}
    with stopped(stack, stack.workers[0], "vjepa2"):
        fill_queue(stack.redis, "vjepa2", "vjepa2", depth)
        wait_depth(stack.url, "vjepa2", depth)
        jobs_before = len(stack.redis.keys("tf:job:*"))
        with redis_paused(stack.redis, 2.0) as until:
            rs = [
                infer(stack, ok),
                httpx.post(stack.url + "/api/v1/infer", content=b"not json at all", headers={"Content-Type": "application/json"}, timeout=10),
                # decided before the route looks at anything: the route itself would answer 415
                httpx.post(stack.url + "/api/v1/infer", content=b"plain text", headers={"Content-Type": "text/plain"}, timeout=10),
                httpx.post(stack.url + "/v1/jobs", json=job, timeout=10),
            ]
            assert time.monotonic() < until, "answered only after Redis did"
        for r in rs:
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded"
            assert f"the 'vjepa2' queue is full ({depth} waiting, MAX_QUEUE_DEPTH={depth})" in r.json()["error"]["message"]
        assert stack.redis.llen("vjepa2") == depth and len(stack.redis.keys("tf:job:*")) == jobs_before
    wait_drained(stack.redis, "vjepa2")
    wait_depth(stack.url, "vjepa2", at_most=0)  # the API's own view, which its next poll brings down
    r = infer(stack, ok)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 5, r.text


def test_root_lists_endpoints_as_json_and_gives_browsers_html(stack) -> None:
    r = httpx.get(stack.url + "/", headers={"Accept": "application/json"}, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    eps = r.json()["endpoints"]
    for ep in ("POST /api/v1/infer", "POST /segment", "POST /segment-batch", "POST /v1/jobs", "GET /health"):
        assert ep in eps
    assert "vjepa2" in r.json()["models"]
    h = httpx.get(stack.url + "/", headers={"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}, timeout=10)
    assert h.status_code == 200 and h.headers["content-type"].startswith("text/html")
    assert "<!doctype html>" in h.text.lower() or "<html" in h.text.lower()


# ---------------------------------------------------------------- video jobs
def _check_timeline(stack, j: dict, expect: list[tuple[int, int]], step: int, frames: list[np.ndarray], oracle) -> dict:
    assert j["status"] == "succeeded", j
    assert j["progress"]["done"] == j["progress"]["total"] == len(expect)
    (out,) = j["result"]["outputs"]
    assert out["key"] == "timeline" and out["content_type"] == "application/json"
    tl = httpx.get(stack.url + f"/v1/jobs/{j['job_id']}/result", timeout=10).json()
    assert tl["fps"] == FPS and tl["frames"] == N_FRAMES and tl["frames_per_clip"] == 16
    got = [(c["start_frame"], c["end_frame"]) for c in tl["clips"]]
    assert got == expect
    assert [c["index"] for c in tl["clips"]] == list(range(len(expect)))
    for c in tl["clips"]:
        assert c["start"] == pytest.approx(c["start_frame"] / FPS) and c["end"] == pytest.approx((c["end_frame"] + 1) / FPS)
    # each clip's answer is the model's answer for exactly those frames
    from tasks import clips as clipc
    from workers.clipjobs import encode_frames
    from workers.runners.base import Item

    for c in tl["clips"]:
        idx = list(range(c["start_frame"], c["end_frame"] + 1, step))
        assert len(idx) == 16
        crops = oracle.resize_crop(np.stack([frames[i] for i in idx]))
        data = clipc.pack_clip(encode_frames(crops), crops.shape[2], crops.shape[1], "RGB", prepared=True)
        item = Item(_req(), data)
        want = oracle.predict([oracle.prepare(item)])[0]
        same_predictions(c["predictions"], want)
    assert len({json.dumps(c["predictions"]) for c in tl["clips"]}) > 1  # the clips do differ
    return tl


def _req():
    from tasks.schemas import InferRequest

    return InferRequest.model_validate({"id": "0" * 32, "model": "vjepa2", "input": {}, "params": {"top_k": 5}, "deadline": time.time() + 60, "out_prefix": "x", "created": time.time()})


def test_video_upload_job_is_cut_into_clips_and_timelined(stack, video_dir: Path, oracle) -> None:
    path = video_dir / "upload.mp4"
    frames = write_video(path)
    assert len(frames) == N_FRAMES
    r = httpx.post(stack.url + "/v1/jobs", data={"model": "vjepa2", "kind": "video", "params": json.dumps({"stride": 16})}, files={"file": ("upload.mp4", path.read_bytes(), "video/mp4")}, timeout=30)
    assert r.status_code == 202, r.text
    j = wait_job(stack.url, r.json()["job_id"])
    # 4 back-to-back clips, then one more ending on the last frame (frames 64..69 were not covered)
    tl = _check_timeline(stack, j, [(0, 15), (16, 31), (32, 47), (48, 63), (54, 69)], 1, frames, oracle)
    assert tl["input"]["kind"] == "video" and tl["input"]["filename"] == "upload.mp4"
    assert j["result"]["meta"]["clips"] == 5 and j["result"]["meta"]["clips_failed"] == 0
    # the per-clip records are cleaned up once the timeline is written
    assert not stack.redis.exists(f"tf:job:{j['job_id']}.0")


def test_video_uri_job_with_frame_step(stack, video_dir: Path, oracle) -> None:
    path = video_dir / "uri.mp4"
    frames = write_video(path)
    r = httpx.post(stack.url + "/v1/jobs", json={"model": "vjepa2", "input": {"video": f"file://{path}"}, "params": {"stride": 16, "frame_step": 2}}, timeout=30)
    assert r.status_code == 202, r.text
    j = wait_job(stack.url, r.json()["job_id"])
    _check_timeline(stack, j, [(0, 30), (16, 46), (32, 62), (39, 69)], 2, frames, oracle)


def test_video_shorter_than_a_clip_gets_one_padded_clip(stack, video_dir: Path, oracle) -> None:
    path = video_dir / "short.mp4"
    frames = write_video(path, 10)
    r = httpx.post(stack.url + "/v1/jobs", json={"model": "vjepa2", "input": {"video": f"file://{path}"}}, timeout=30)
    j = wait_job(stack.url, r.json()["job_id"])
    assert j["status"] == "succeeded", j
    tl = httpx.get(stack.url + f"/v1/jobs/{j['job_id']}/result", timeout=10).json()
    (clip,) = tl["clips"]
    assert (clip["start_frame"], clip["end_frame"], tl["frames"]) == (0, 9, 10)
    crops = oracle.resize_crop(np.stack([frames[min(i, 9)] for i in range(16)]))  # the last frame repeated
    from tasks import clips as clipc
    from workers.clipjobs import encode_frames
    from workers.runners.base import Item

    data = clipc.pack_clip(encode_frames(crops), crops.shape[2], crops.shape[1], "RGB", prepared=True)
    same_predictions(clip["predictions"], oracle.predict([oracle.prepare(Item(_req(), data))])[0])


@pytest.fixture(scope="module")
def s3_stack(make_stack, ckpt: Path, moto_s3: str):
    make_bucket(moto_s3, "vids")
    return make_stack(models=["vjepa2"], env={"VJEPA2_CHECKPOINT": str(ckpt), "S3_ENDPOINT_URL": moto_s3}, storage="s3://vids/trifecta")


def test_video_job_from_s3(s3_stack, moto_s3: str, video_dir: Path) -> None:
    import boto3

    path = video_dir / "s3.mp4"
    write_video(path, 40)
    boto3.client("s3", endpoint_url=moto_s3).put_object(Bucket="vids", Key="trifecta/default/in/s3.mp4", Body=path.read_bytes())
    r = httpx.post(s3_stack.url + "/v1/jobs", json={"model": "vjepa2", "input": {"video": "s3://vids/trifecta/default/in/s3.mp4"}}, timeout=30)
    assert r.status_code == 202, r.text
    j = wait_job(s3_stack.url, r.json()["job_id"])
    assert j["status"] == "succeeded", j
    tl = json.loads(boto3.client("s3", endpoint_url=moto_s3).get_object(Bucket="vids", Key=f"trifecta/{j['result']['outputs'][0]['path']}")["Body"].read())
    assert [(c["start_frame"], c["end_frame"]) for c in tl["clips"]] == [(0, 15), (16, 31), (24, 39)]
    r = httpx.post(s3_stack.url + "/v1/jobs", json={"model": "vjepa2", "input": {"video": "s3://other-bucket/x.mp4"}}, timeout=30)
    assert r.status_code == 403


def test_bad_videos_fail_their_job_with_the_reason(stack, video_dir: Path) -> None:
    r = httpx.post(stack.url + "/v1/jobs", data={"model": "vjepa2", "kind": "video"}, files={"file": ("x.mp4", b"\x00\x01 not a video at all" * 50, "video/mp4")}, timeout=30)
    j = wait_job(stack.url, r.json()["job_id"])
    assert j["status"] == "failed" and j["error"]["code"] == "unreadable_video", j
    r = httpx.post(stack.url + "/v1/jobs", json={"model": "vjepa2", "input": {"video": "file:///etc/passwd"}}, timeout=30)
    assert r.status_code == 403
    r = httpx.post(stack.url + "/v1/jobs", json={"model": "vjepa2", "input": {"video": "x"}, "params": {"stride": 0}}, timeout=30)
    assert r.status_code == 422 and "stride" in r.json()["error"]["message"]


# ---------------------------------------------------------------- frames jobs (streaming consumers)
def test_frames_job_returns_at_once_and_calls_back_signed(stack, receiver) -> None:
    from tasks.webhooks import verify

    fr = frames_rgb(5, 32)
    t0 = time.time()
    r = httpx.post(
        stack.url + "/v1/jobs",
        json={"model": "vjepa2", "input": {"frames": [b64(f.tobytes()) for f in fr], "width": W, "height": H, "format": "RGB", "fps": 8}, "callback_url": f"http://127.0.0.1:{receiver.server_port}/cb"},
        timeout=30,
    )
    assert r.status_code == 202 and time.time() - t0 < 5
    job_id = r.json()["job_id"]
    t_end = time.time() + 60
    while not _Catcher.got and time.time() < t_end:
        time.sleep(0.05)
    assert _Catcher.got, "no callback arrived"
    headers, raw = _Catcher.got[0]
    assert verify(SECRET, headers.get("x-trifecta-signature"), raw)
    cb = json.loads(raw)
    assert cb["job_id"] == job_id and cb["status"] == "succeeded"
    res = cb["result"]["meta"]["clip_results"]
    assert [(c["start_frame"], c["end_frame"], c["start"], c["end"]) for c in res] == [(0, 15, 0.0, 2.0), (16, 31, 2.0, 4.0)]
    # each clip's answer is what /api/v1/infer answers for the same 16 frames
    for c, part in zip(res, (fr[:16], fr[16:]), strict=True):
        want = infer(stack, {"frames": [b64(f.tobytes()) for f in part], "width": W, "height": H, "format": "RGB"}).json()["predictions"]
        same_predictions(c["predictions"], want)
    polled = wait_job(stack.url, job_id)
    assert polled["status"] == "succeeded" and polled["result"]["meta"]["clip_results"] == res
    # a one-clip job answers like /api/v1/infer
    r = httpx.post(stack.url + "/v1/jobs", json={"model": "vjepa2", "input": {"frames": [b64(f.tobytes()) for f in fr[:16]], "width": W, "height": H, "format": "RGB"}}, timeout=30)
    one = wait_job(stack.url, r.json()["job_id"])["result"]["meta"]
    assert one["clip_id"] == str(uuid.UUID(r.json()["job_id"]))
    same_predictions(one["predictions"], res[0]["predictions"])
    r = httpx.post(stack.url + "/v1/jobs", json={"model": "vjepa2", "input": {"frames": [b64(f.tobytes()) for f in fr[:20]], "width": W, "height": H}}, timeout=30)
    assert r.status_code == 422 and "multiple of 16" in r.json()["error"]["message"]


# ---------------------------------------------------------------- offline start
def test_offline_fetch_falls_back_to_tiny_checkpoints_loudly(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "MODEL_DIR": str(tmp_path), "HF_LOCAL_FILES_ONLY": "true", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "VJEPA2_CHECKPOINT": "facebook/vjepa2-vitl-fpc16-256-ssv2", "M2F_CHECKPOINT": "facebook/mask2former-swin-large-ade-semantic"}
    p = subprocess.run([sys.executable, "-m", "client.cli", "models", "fetch", "vjepa2", "mask2former"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "UNTRAINED tiny random-init checkpoint" in p.stdout and "MEANINGLESS" in p.stdout
    for name in ("vjepa2-tiny", "mask2former-tiny"):
        assert (tmp_path / name / "config.json").is_file() and (tmp_path / name / "model.safetensors").is_file()
