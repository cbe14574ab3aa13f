"""SAM3 video tracking with the real models (issue #5): text prompts through transformers'
`Sam3VideoModel`, box and point prompts through `Sam3TrackerVideoModel`, both loaded from
the tiny random-init checkpoint `trifecta models tiny sam3 DIR` writes (the production
`from_pretrained` path), on a video of moving shapes written here with PyAV, behind the
real API with a real sam3 worker process.

Random weights give arbitrary masks, so what is checked is structure and consistency:
every frame in range answered, masks decoding to the video's size, boxes agreeing with
their masks, object ids the same through the video, a prompt frame's mask the same in the
propagation, per-frame job outputs in storage with the job's progress.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from websockets.sync.client import connect as ws_connect

from storage import codecs
from tasks.sam3_video import session_key
from tests.conftest import ROOT, stopped, wait_job
from tests.helpers.videos import FPS, H, N, W, write_video

B = 120.0
# frames of long.mp4: a propagation over it lasts far longer than the few ms between a poll
# that sees it `running` and the signal that stops or kills its worker, so a cancel or a
# kill always lands mid-propagation
LONG = 120
pytestmark = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="SAM3's video processor needs torchvision")


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("videos")
    write_video(d / "shapes.mp4")
    write_video(d / "long.mp4", frames=LONG)
    return d


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sam3video") / "tiny"
    r = subprocess.run([sys.executable, "-m", "client.cli", "models", "tiny", "sam3", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def sam3_stack(make_stack, videos: Path, tiny: Path):
    env = {"SAM3_CHECKPOINT": str(tiny), "ALLOWED_INPUT_ROOTS": str(videos), "MAX_BATCH_SIZE": "1", "INTRA_OP_THREADS": "1", "MAX_PROMPTS": "8"}
    return make_stack(models=["sam3"], env=env)


def _api(stack) -> str:
    return stack.url + "/api/v1/video"


def _start(stack, videos: Path, sid: str, name: str = "shapes.mp4") -> dict:
    r = httpx.post(_api(stack) + "/session/start", json={"resource_path": str(videos / name), "session_id": sid}, timeout=B)
    assert r.status_code == 200, r.text
    return r.json()


def _prompt(stack, sid: str, body: dict) -> httpx.Response:
    return httpx.post(f"{_api(stack)}/session/{sid}/prompt", json=body, timeout=B)


def _propagate(stack, sid: str, **body) -> dict:
    r = httpx.post(f"{_api(stack)}/session/{sid}/propagate", json=body, timeout=B)
    assert r.status_code == 200, r.text
    return r.json()


def _bbox(mask: np.ndarray) -> list[float]:
    """[cx, cy, w, h] normalised of a mask's pixels, as the worker computes boxes (torchvision's masks_to_boxes)."""
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max(), ys.max()
    h, w = mask.shape
    return [(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h]


def _inside(mask: np.ndarray, box: list[float]) -> bool:
    """Every pixel of the mask lies in the box (text boxes are taken before the non-overlap step, which only removes pixels)."""
    cx, cy, bw, bh = box
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    eps = 1e-3
    return bool(((xs >= (cx - bw / 2) * w - eps) & (xs <= (cx + bw / 2) * w + eps) & (ys >= (cy - bh / 2) * h - eps) & (ys <= (cy + bh / 2) * h + eps)).all())


def _check_frames(results: dict, frames: list[int]) -> dict[int, dict[int, dict]]:
    """Every expected frame answered, each object's RLE mask decoding at the video's size; → {frame: {id: object}}."""
    assert sorted(int(k) for k in results) == frames
    out: dict[int, dict[int, dict]] = {}
    for k, fr in results.items():
        assert fr["frame_index"] == int(k)
        ids = [o["id"] for o in fr["objects"]]
        assert len(ids) == len(set(ids)), f"frame {k}: an id twice: {ids}"
        for o in fr["objects"]:
            assert o["mask"]["size"] == [H, W]
            m = codecs.decode_rle(o["mask"])
            assert m.shape == (H, W) and m.dtype == bool
            o["_mask"] = m
            assert len(o["box"]) == 4 and all(0.0 <= v <= 1.0 for v in o["box"])
            assert 0.0 <= o["score"] <= 1.0
        out[int(k)] = {o["id"]: o for o in fr["objects"]}
    return out


# ---------------------------------------------------------------- text prompts
def test_text_prompt_then_propagate_every_frame(sam3_stack, videos: Path) -> None:
    wid = sam3_stack.workers[0].name
    info = _start(sam3_stack, videos, "s-text")
    assert info["worker"] == wid and info["video_info"]["total_frames"] == N
    assert info["video_info"]["resolution"] == {"width": W, "height": H} and info["video_info"]["fps"] == pytest.approx(FPS)
    p = _prompt(sam3_stack, "s-text", {"frame_index": 3, "prompts": [{"type": "text", "text": "red square"}]})
    assert p.status_code == 200, p.text
    pb = p.json()
    ids = pb["obj_ids"]
    # the tiny checkpoint tracks its first 2 detections (max_num_objects=2)
    assert pb["frame_index"] == 3 and pb["worker"] == wid and len(ids) == 2 and pb["obj_id"] == ids[0]
    assert len(pb["masks"]) == len(pb["boxes"]) == len(pb["scores"]) == 2
    for rle, box in zip(pb["masks"], pb["boxes"], strict=True):
        m = codecs.decode_rle(rle)
        assert m.shape == (H, W) and m.any() and _inside(m, box)

    body = _propagate(sam3_stack, "s-text", direction="both", start_frame_index=3, stream=False)
    assert body["session_id"] == "s-text" and body["worker"] == wid and body["total_frames"] == N and body["processing_time_ms"] > 0
    frames = _check_frames(body["results"], list(range(N)))
    seen = set()
    for fi, objs in frames.items():
        assert set(objs) <= set(ids), f"frame {fi}: ids {sorted(objs)} are not the prompt's {ids}"
        seen |= set(objs)
        for o in objs.values():
            assert _inside(o["_mask"], o["box"])
    assert seen == set(ids)
    assert sum(len(objs) for objs in frames.values()) >= N  # objects are there, not just frames

    # the flat endpoint, a bounded forward run from the start: max_frames past the start frame
    flat = httpx.post(_api(sam3_stack) + "/propagate", json={"session_id": "s-text", "direction": "forward", "start_frame_index": 0, "max_frames": 4}, timeout=B)
    assert flat.status_code == 200, flat.text
    again = _check_frames(flat.json()["results"], list(range(5)))
    assert {i for objs in again.values() for i in objs} == set(ids)  # propagating again from elsewhere keeps the ids

    # the WebSocket: one message per frame as it is computed, the same ids, then complete
    with ws_connect(sam3_stack.url.replace("http://", "ws://") + "/api/v1/video/ws/propagate/s-text", open_timeout=B) as ws:
        ws.send(json.dumps({"direction": "forward", "start_frame_index": 0}))
        msgs = [json.loads(ws.recv(timeout=B))]
        while msgs[-1]["type"] == "frame":
            msgs.append(json.loads(ws.recv(timeout=B)))
    assert [m["frame_index"] for m in msgs[:-1]] == list(range(N))
    assert {o["id"] for m in msgs[:-1] for o in m["objects"]} == set(ids)
    assert msgs[-1]["type"] == "complete" and msgs[-1]["total_frames"] == N

    st = httpx.get(_api(sam3_stack) + "/session/s-text/status", timeout=B).json()
    assert st["worker"] == wid and st["model_state"] is True and st["prompts"] == [{"frame_index": 3, "texts": ["red square"]}]
    assert st["objects"] == sorted(ids)
    assert httpx.delete(_api(sam3_stack) + "/session/s-text", timeout=B).status_code == 200


# ---------------------------------------------------------------- box and point prompts
def test_box_and_point_prompts_track_through_the_video(sam3_stack, videos: Path) -> None:
    _start(sam3_stack, videos, "s-geo")
    box = _prompt(sam3_stack, "s-geo", {"frame_index": 2, "prompts": [{"type": "box", "box": [0.3, 0.35, 0.25, 0.3], "label": True}]})
    assert box.status_code == 200, box.text
    b = box.json()
    assert b["frame_index"] == 2 and b["obj_id"] == 0 and b["obj_ids"] == [0] and len(b["masks"]) == 1  # the first object: a new id
    box_mask = codecs.decode_rle(b["masks"][0])
    assert box_mask.shape == (H, W) and box_mask.any()
    assert b["boxes"][0] == pytest.approx(_bbox(box_mask), abs=1e-5)

    pts = _prompt(sam3_stack, "s-geo", {"frame_index": 6, "obj_id": 7, "prompts": [{"type": "point", "point": [0.5, 0.4], "label": 1}, {"type": "point", "point": [0.1, 0.9], "label": 0}]})
    assert pts.status_code == 200, pts.text
    pm = pts.json()
    assert pm["obj_id"] == 7 and pm["obj_ids"] == [7] and pm["frame_index"] == 6
    point_mask = codecs.decode_rle(pm["masks"][0])

    # a text prompt in the same session: its objects get ids after the box/point ones
    t = _prompt(sam3_stack, "s-geo", {"frame_index": 0, "prompts": ["green disc"]})
    assert t.status_code == 200, t.text
    text_ids = t.json()["obj_ids"]
    assert len(text_ids) == 2 and min(text_ids) > 7
    # box/point prompts cannot take over an object the text model found
    taken = _prompt(sam3_stack, "s-geo", {"frame_index": 0, "obj_id": text_ids[0], "prompts": [{"type": "point", "point": [0.5, 0.5]}]})
    assert taken.status_code == 409 and "text prompt" in taken.json()["error"]["message"]

    body = _propagate(sam3_stack, "s-geo", direction="both", start_frame_index=4)
    assert body["total_frames"] == N
    frames = _check_frames(body["results"], list(range(N)))
    assert {i for objs in frames.values() for i in objs} <= {0, 7, *text_ids}
    for fi, objs in frames.items():
        for oid in (0, 7):
            if oid in objs:  # a tracker object's box is its mask's bounding box
                assert objs[oid]["box"] == pytest.approx(_bbox(objs[oid]["_mask"]), abs=1e-5), (fi, oid)
    # on its prompt frame the tracker answers the object's prompted mask again
    assert np.array_equal(frames[2][0]["_mask"], box_mask)
    assert np.array_equal(frames[6][7]["_mask"], point_mask)
    tracked = [fi for fi, objs in frames.items() if 0 in objs and 7 in objs]
    assert len(tracked) >= N // 2, f"the box and point objects are tracked on few frames: {tracked}"

    # stop tracking the point object: it is gone from the next propagation, the box object stays
    rm = httpx.delete(_api(sam3_stack) + "/session/s-geo/object/7", timeout=B)
    assert rm.status_code == 200 and rm.json()["objects"] == sorted([0, *text_ids]), rm.text
    after = _check_frames(_propagate(sam3_stack, "s-geo", direction="forward", start_frame_index=2)["results"], list(range(2, N)))
    assert all(7 not in objs for objs in after.values())
    assert np.array_equal(after[2][0]["_mask"], box_mask)  # re-made from its box, the same mask
    st = httpx.get(_api(sam3_stack) + "/session/s-geo/status", timeout=B).json()
    assert st["objects"] == sorted([0, *text_ids])
    assert [p.get("obj_id") for p in st["prompts"] if "texts" not in p] == [0]
    assert st["prompts"][0]["prompts"] == [{"type": "box", "box": [0.3, 0.35, 0.25, 0.3]}]

    # a box/point-only session propagates too (the tracker alone), and reset forgets everything
    assert httpx.post(_api(sam3_stack) + "/session/s-geo/reset", timeout=B).status_code == 200
    again = _prompt(sam3_stack, "s-geo", {"frame_index": 0, "prompts": [{"type": "point", "point": [0.9, 0.2]}]})
    assert again.status_code == 200 and again.json()["obj_id"] == 0, again.text
    only = _check_frames(_propagate(sam3_stack, "s-geo", direction="forward")["results"], list(range(N)))
    assert {i for objs in only.values() for i in objs} == {0}
    assert httpx.delete(_api(sam3_stack) + "/session/s-geo", timeout=B).status_code == 200


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ([{"type": "box", "box": [0.5, 0.5, 0.2]}], "[cx, cy, w, h]"),
        ([{"type": "box", "box": [0.5, 0.5, 0.2, 1.5]}], "outside [0, 1]"),
        ([{"type": "box", "box": [0.1, 0.1, 0.5, 0.5]}], "reaches outside"),
        ([{"type": "box", "box": [0.5, 0.5, 0.2, 0.2], "label": False}], "negative box"),
        ([{"type": "box", "box": [0.5, 0.5, 0.2, 0.2]}, {"type": "box", "box": [0.2, 0.2, 0.1, 0.1]}], "one call per object"),
        ([{"type": "point", "point": [0.5]}], "[x, y]"),
        ([{"type": "point", "point": [0.5, 1.2]}], "outside the frame"),
        ([{"type": "point", "point": ["a", 0.5]}], "finite numbers"),
        ([{"type": "point", "point": [0.5, 0.5], "label": 2}], "label must be 1"),
        ([{"type": "text", "text": "cat"}, {"type": "point", "point": [0.5, 0.5]}], "separate calls"),
        ([{"type": "mask", "mask": []}], "unknown type"),
        ([{"type": "text", "text": "  "}], "non-empty string"),
        ([], "non-empty list"),
        ("cat", "non-empty list"),
        ([{"type": "point", "point": [0.5, 0.5]}] * 9, "MAX_PROMPTS"),
    ],
)
def test_bad_prompts_are_422(sam3_stack, videos: Path, prompts, message: str) -> None:
    sid = "s-bad"
    if not sam3_stack.redis.exists(session_key("default", sid)):
        _start(sam3_stack, videos, sid)
    r = _prompt(sam3_stack, sid, {"frame_index": 1, "prompts": prompts})
    assert r.status_code == 422 and message in r.json()["error"]["message"], r.text
    ok = _prompt(sam3_stack, sid, {"frame_index": 1, "prompts": [{"type": "point", "point": [0.5, 0.5]}]})
    assert ok.status_code == 200 and ok.json()["obj_ids"] == [ok.json()["obj_id"]]  # the session still answers


# ---------------------------------------------------------------- propagation as a job
def test_propagate_job_writes_every_frame_to_storage(sam3_stack, videos: Path) -> None:
    data = Path(sam3_stack.env["STORAGE_URL"].removeprefix("file://"))
    _start(sam3_stack, videos, "s-job")
    p = _prompt(sam3_stack, "s-job", {"frame_index": 0, "prompts": [{"type": "text", "text": "square"}]})
    assert p.status_code == 200, p.text
    ids = set(p.json()["obj_ids"])
    g = _prompt(sam3_stack, "s-job", {"frame_index": 5, "prompts": [{"type": "box", "box": [0.5, 0.5, 0.5, 0.5]}]})
    assert g.status_code == 200, g.text
    ids.add(g.json()["obj_id"])

    r = httpx.post(_api(sam3_stack) + "/session/s-job/propagate", json={"direction": "forward", "start_frame_index": 0, "async": True}, timeout=B)
    assert r.status_code == 202, r.text
    acc = r.json()
    job_id = acc["job_id"]
    assert acc["status"] == "queued" and acc["kind"] == "video-propagate" and acc["session_id"] == "s-job"
    assert r.headers["Location"] == f"/v1/jobs/{job_id}" and acc["links"]["self"] == f"/v1/jobs/{job_id}"
    j = wait_job(sam3_stack.url, job_id, timeout=B)
    assert j["status"] == "succeeded", j
    assert j["kind"] == "video-propagate" and j["worker"] == sam3_stack.workers[0].name
    assert j["progress"]["done"] == j["progress"]["total"] == N and j["progress"]["last_frame_index"] == N - 1
    outs = j["result"]["outputs"]
    assert [o["frame_index"] for o in outs] == list(range(N)) and [o["key"] for o in outs] == [f"frame_{i:06d}" for i in range(N)]
    assert j["result"]["meta"]["total_frames"] == N and j["result"]["meta"]["session_id"] == "s-job"
    seen: set[int] = set()
    for o in outs:
        assert o["path"] == f"default/jobs/{job_id}/frames/{o['frame_index']:06d}.json" and o["shape"] == [H, W]
        raw = (data / o["path"]).read_bytes()
        assert len(raw) == o["bytes"]
        frame = orjson.loads(raw)
        objs = _check_frames({str(frame["frame_index"]): frame}, [o["frame_index"]])[o["frame_index"]]
        assert set(objs) <= ids
        seen |= set(objs)
    assert seen == ids
    # the same bytes through the jobs API, and the job in the tenant's list
    one = httpx.get(f"{sam3_stack.url}/v1/jobs/{job_id}/result", params={"key": "frame_000005"}, timeout=B)
    assert one.status_code == 200 and one.content == (data / outs[5]["path"]).read_bytes()
    listed = httpx.get(sam3_stack.url + "/v1/jobs", timeout=B).json()
    assert job_id in [x["job_id"] for x in listed["jobs"]]

    # bad requests are refused before anything is queued
    bad = httpx.post(_api(sam3_stack) + "/propagate", json={"session_id": "s-job", "async": "yes"}, timeout=B)
    assert bad.status_code == 422 and "async must be true or false" in bad.json()["error"]["message"]
    assert httpx.post(_api(sam3_stack) + "/propagate", json={"session_id": "s-job", "async": True, "direction": "up"}, timeout=B).status_code == 422
    assert httpx.post(_api(sam3_stack) + "/session/nope/propagate", json={"async": True}, timeout=B).status_code == 404
    assert httpx.delete(_api(sam3_stack) + "/session/s-job", timeout=B).status_code == 200


def test_propagate_job_fails_for_a_bad_frame_and_stops_when_cancelled(sam3_stack, videos: Path) -> None:
    _start(sam3_stack, videos, "s-cancel", "long.mp4")
    assert _prompt(sam3_stack, "s-cancel", {"frame_index": 0, "prompts": ["square"]}).status_code == 200
    # a start frame past the end: the worker fails the job with the 422's message
    r = httpx.post(_api(sam3_stack) + "/session/s-cancel/propagate", json={"async": True, "start_frame_index": LONG}, timeout=B)
    assert r.status_code == 202, r.text
    j = wait_job(sam3_stack.url, r.json()["job_id"], timeout=B)
    assert j["status"] == "failed" and "outside the video" in j["error"]["message"], j
    # cancelled while it runs: it stops (fewer frames than the video), the session answers again.
    # The worker is held (SIGSTOP) from the moment the job is seen running until the cancel is
    # recorded, so the cancel always finds the job mid-propagation.
    r = httpx.post(_api(sam3_stack) + "/session/s-cancel/propagate", json={"async": True, "direction": "forward"}, timeout=B)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    j = wait_job(sam3_stack.url, job_id, timeout=B, until=("running", "succeeded"))
    assert j["status"] == "running", j
    with stopped(sam3_stack, sam3_stack.workers[0], "sam3", fresh=False):
        c = httpx.delete(f"{sam3_stack.url}/v1/jobs/{job_id}", timeout=B)
    assert c.status_code == 200 and c.json()["status"] == "cancelled", c.text
    st = httpx.get(_api(sam3_stack) + "/session/s-cancel/status", timeout=B)  # waits for the worker to let the session go
    assert st.status_code == 200 and st.json()["video_info"]["total_frames"] == LONG
    j = wait_job(sam3_stack.url, job_id, timeout=B)
    assert j["status"] == "cancelled" and j["result"] is None and j["progress"]["done"] < LONG, j

    # a WebSocket client that leaves stops the propagation too: the worker finds no one listening
    with ws_connect(sam3_stack.url.replace("http://", "ws://") + "/api/v1/video/ws/propagate/s-cancel", open_timeout=B) as ws:
        ws.send(json.dumps({"direction": "forward", "start_frame_index": 0}))
        first = json.loads(ws.recv(timeout=B))
    assert first["type"] == "frame" and first["frame_index"] == 0
    assert httpx.get(_api(sam3_stack) + "/session/s-cancel/status", timeout=B).status_code == 200  # after the worker let the session go
    log = sam3_stack.workers[0].log.read_text()
    ended = [line for line in log.splitlines() if "session s-cancel: propagation stopped" in line and "stream closed" in line]
    assert len(ended) == 1 and int(ended[0].split("after ")[1].split()[0]) < LONG, ended
    assert httpx.delete(_api(sam3_stack) + "/session/s-cancel", timeout=B).status_code == 200


def test_propagate_job_of_a_dead_worker_fails_with_gone(make_stack, videos: Path, tiny: Path) -> None:
    """The job runs on the one worker holding the session: when that worker dies mid-propagation,
    the next poll fails the job with 410's code instead of showing `running` until the TTL."""
    env = {"SAM3_CHECKPOINT": str(tiny), "ALLOWED_INPUT_ROOTS": str(videos), "MAX_BATCH_SIZE": "1", "INTRA_OP_THREADS": "1", "WORKER_HEARTBEAT_S": "1"}
    st = make_stack(models=["sam3"], env=env)
    _start(st, videos, "s-orphan", "long.mp4")
    assert _prompt(st, "s-orphan", {"frame_index": 0, "prompts": ["square"]}).status_code == 200
    r = httpx.post(_api(st) + "/session/s-orphan/propagate", json={"async": True, "direction": "forward"}, timeout=B)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    j = wait_job(st.url, job_id, timeout=B, until=("running", "succeeded"))
    assert j["status"] == "running", j  # LONG frames: the kill below always lands mid-propagation
    st.workers[0].kill()
    j = wait_job(st.url, job_id, timeout=60)  # the worker's registration expires within a few heartbeats
    assert j["status"] == "failed" and j["error"]["code"] == "gone", j
    assert j["worker"] == r.json()["worker"] and j["progress"]["done"] < LONG
    assert "start a new session" in j["error"]["message"]
    again = httpx.get(f"{st.url}/v1/jobs/{job_id}", timeout=B).json()
    assert again["status"] == "failed" and again["finished_at"] == j["finished_at"]  # failed once, stays failed
