"""Admission on the endpoints that enqueue onto one worker's private queue or whose model is in
the body: SAM3 video session calls (decode-only sessions on two `echo` workers,
VIDEO_SESSION_MODEL=echo) and `/v1/jobs`, through real worker processes behind the real API.

`MAX_QUEUE_DEPTH=4` over two workers: each private queue's share is 2. The other endpoints'
full-queue 503s are tested with their models (test_vjepa2, test_mask2former, test_sam3_image).
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

import av
import httpx
import numpy as np
import pytest

from tests.conftest import fill_queue, photo, png_bytes, stopped, wait_depth, wait_drained

B = 60.0


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("videos")
    with av.open(str(d / "grey.mp4"), "w") as out:
        s = out.add_stream("mpeg4", rate=12)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(6):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return d


@pytest.fixture(scope="module")
def stack(make_stack, videos: Path):
    env = {"VIDEO_SESSION_MODEL": "echo", "MAX_QUEUE_DEPTH": "4", "ALLOWED_INPUT_ROOTS": str(videos), "MAX_BATCH_SIZE": "1"}
    return make_stack(models=["echo", "echo"], env=env)


def _start(stack, videos: Path) -> dict:
    r = httpx.post(stack.url + "/api/v1/video/session/start", json={"video_path": str(videos / "grey.mp4")}, timeout=B)
    assert r.status_code == 200, r.text
    w = r.json()["worker"]
    t_end = time.time() + 10  # until the worker's registration counts it, and the API has polled that
    while int(stack.redis.hget(f"tf:worker:{w}", "sessions") or 0) < 1:
        assert time.time() < t_end
        time.sleep(0.05)
    time.sleep(0.3)
    return r.json()


def _status(stack, sid: str) -> httpx.Response:
    return httpx.get(f"{stack.url}/api/v1/video/session/{sid}/status", timeout=B)


def test_full_private_queue_refuses_its_sessions_calls_only(stack, videos: Path) -> None:
    a, b = _start(stack, videos), _start(stack, videos)
    assert a["worker"] != b["worker"], "the second session goes to the least loaded worker"
    hot_q = f"echo.{a['worker']}"
    hot = next(w for w in stack.workers if w.name == a["worker"])
    with stopped(stack, hot, "echo"):
        fill_queue(stack.redis, hot_q, "echo", 2)
        wait_depth(stack.url, "echo", 2)
        jobs_before = len(stack.redis.keys("tf:job:*"))
        calls = [
            _status(stack, a["session_id"]),
            httpx.post(f"{stack.url}/api/v1/video/session/{a['session_id']}/propagate", json={"async": True}, timeout=B),  # a job on that queue
        ]
        for r in calls:
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded"
            assert f"worker queue '{hot_q}' is full (2 waiting; its share of MAX_QUEUE_DEPTH=4 over 2 workers is 2)" in r.json()["error"]["message"]
        assert stack.redis.llen(hot_q) == 2 and len(stack.redis.keys("tf:job:*")) == jobs_before  # nothing enqueued
        # the other worker's session, and the shared queue (2 + 1 <= 4), still take work
        r = _status(stack, b["session_id"])
        assert r.status_code == 200 and r.json()["worker"] == b["worker"] and r.json()["video_info"]["total_frames"] == 6, r.text
        r = httpx.post(stack.url + "/run_echo", content=b"12345", timeout=B)
        assert r.status_code == 200 and r.json()["bytes"] == 5 and r.json()["job_id"]
    wait_drained(stack.redis, hot_q)
    wait_depth(stack.url, "echo", at_most=0)  # the API's own view, which its next poll brings down (POLL_S)
    r = _status(stack, a["session_id"])
    assert r.status_code == 200 and r.json()["worker"] == a["worker"], r.text
    for s in (a, b):  # a close is never refused for a full queue; here it simply closes
        assert httpx.delete(f"{stack.url}/api/v1/video/session/{s['session_id']}", timeout=B).json()["closed"] is True


def test_jobs_for_a_model_without_a_worker_get_503_and_nothing_is_written(stack, videos: Path) -> None:
    """The model is in the body, so the route decides (from memory, after validating the input)."""
    keys_before = set(stack.redis.keys("tf:job:*"))
    image = base64.b64encode(png_bytes(photo("coffee.png").resize((32, 24)))).decode()
    shard = f"file://{videos}/shard-000.tar"
    for body in ({"model": "textmask", "input": {"image": image}}, {"model": "textmask", "input": {"shards": [shard]}}):
        r = httpx.post(stack.url + "/v1/jobs", json=body, timeout=B)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "5" and r.json()["error"]["code"] == "no_worker" and "'textmask'" in r.json()["error"]["message"]
    # bad input is still its own 4xx first, worker or not
    r = httpx.post(stack.url + "/v1/jobs", json={"model": "textmask", "input": {"image": "!!"}}, timeout=B)
    assert r.status_code == 422 and "base64" in r.json()["error"]["message"]
    assert set(stack.redis.keys("tf:job:*")) == keys_before and stack.redis.llen("textmask") == 0 and stack.redis.llen("textmask:shards") == 0
    r = httpx.post(stack.url + "/v1/jobs", json={"model": "echo", "input": {"image": image}}, timeout=B)
    assert r.status_code == 202, r.text
