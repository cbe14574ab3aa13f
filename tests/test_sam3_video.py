"""SAM3 video sessions (issue #5): session affinity, limits, uploads and a worker's death,
through real worker processes behind the real API, with videos written here with PyAV.

The workers are `echo` workers holding decode-only sessions (VIDEO_SESSION_MODEL=echo): the
same session code the sam3 worker registers (`workers/runners/sam3_video.py`), with the
video decoding real but no SAM3 video model, so prompt/propagate answer 503 here. The real
models (text, box and point prompts, propagation, jobs) are in test_sam3_video_tracking.py.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from websockets.sync.client import connect as ws_connect

from tasks.errors import Unprocessable
from tasks.sam3_video import check_frame, check_session_id, session_key
from tests.helpers.videos import FPS, H, N, W, write_video

B = 60.0


# ---------------------------------------------------------------- pure parts
def test_session_ids_and_frame_bounds() -> None:
    assert check_session_id("abc-1_2.x") == "abc-1_2.x" and session_key("default", "s1") == "tf:session:default:s1"
    for bad in ("", "a/b", "x" * 65, 3, None, "../x y"):
        with pytest.raises(Unprocessable):
            check_session_id(bad)
    check_frame(0, 12)
    check_frame(11, 12)
    with pytest.raises(Unprocessable, match="outside the video"):
        check_frame(12, 12)


# ---------------------------------------------------------------- the stack: API + two session workers
@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("videos")
    write_video(d / "shapes.mp4")
    write_video(d / "long.mp4", frames=30)
    (d / "garbage.mp4").write_bytes(b"\x00not a video at all" * 100)
    return d


@pytest.fixture(scope="module")
def stack(make_stack, videos: Path):
    env = {"VIDEO_SESSION_MODEL": "echo", "MAX_SESSIONS_PER_WORKER": "2", "ALLOWED_INPUT_ROOTS": str(videos), "MAX_VIDEO_FRAMES": "20", "WORKER_HEARTBEAT_S": "1"}
    return make_stack(models=["echo", "echo"], env=env)


def _sessions_on(stack, worker: str) -> int:
    return int(stack.redis.hget(f"tf:worker:{worker}", "sessions") or -1)


def _settle(stack, counts: dict[str, int]) -> None:
    """Until the workers' registration hashes show these session counts and the API has polled them."""
    t_end = time.time() + 10
    while time.time() < t_end and any(_sessions_on(stack, w) != n for w, n in counts.items()):
        time.sleep(0.05)
    assert {w: _sessions_on(stack, w) for w in counts} == counts
    time.sleep(0.5)  # the API's poller reads them every 0.1 s


def _start(stack, name: str = "shapes.mp4", videos: Path | None = None, **extra) -> httpx.Response:
    return httpx.post(stack.url + "/api/v1/video/session/start", json={"video_path": str(videos / name), **extra}, timeout=B)


def _close(stack, sid: str) -> httpx.Response:
    return httpx.delete(f"{stack.url}/api/v1/video/session/{sid}", timeout=B)


def test_start_status_affinity_and_least_loaded(stack, videos: Path) -> None:
    workers = sorted(w.name for w in stack.workers)
    r = _start(stack, videos=videos, session_id="s-one", gpu_ids=[0, 1])  # extra fields are ignored
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["session_id"] == "s-one" and body["status"] == "ready"
    info = body["video_info"]
    assert info["total_frames"] == N and info["resolution"] == {"width": W, "height": H}
    assert info["fps"] == pytest.approx(FPS) and info["duration_seconds"] == pytest.approx(N / FPS)
    first = body["worker"]
    assert first in workers
    assert stack.redis.hget(session_key("default", "s-one"), "queue").decode() == f"echo.{first}"
    for _ in range(3):  # every call lands on the session's worker
        st = httpx.get(f"{stack.url}/api/v1/video/session/s-one/status", timeout=B)
        assert st.status_code == 200, st.text
        assert st.json()["worker"] == first and st.json()["video_info"]["total_frames"] == N
    other = next(w for w in workers if w != first)
    _settle(stack, {first: 1, other: 0})
    r2 = _start(stack, videos=videos)  # least loaded: the other worker
    assert r2.status_code == 200, r2.text
    sid2 = r2.json()["session_id"]
    assert r2.json()["worker"] == other and uuid.UUID(sid2)
    assert httpx.get(f"{stack.url}/api/v1/video/session/{sid2}/status", timeout=B).json()["worker"] == other
    listed = httpx.get(stack.url + "/api/v1/video/sessions", timeout=B).json()
    assert {s["session_id"]: s["worker"] for s in listed["sessions"]} == {"s-one": first, sid2: other}
    assert _start(stack, videos=videos, session_id="s-one").status_code == 409
    for sid in ("s-one", sid2):
        c = _close(stack, sid)
        assert c.status_code == 200 and c.json()["closed"] is True, c.text
    _settle(stack, {first: 0, other: 0})
    assert httpx.get(f"{stack.url}/api/v1/video/session/s-one/status", timeout=B).status_code == 404
    assert httpx.get(stack.url + "/api/v1/video/sessions", timeout=B).json()["count"] == 0


def test_session_calls_and_bad_input(stack, videos: Path) -> None:
    u = stack.url + "/api/v1/video"
    r = _start(stack, videos=videos, session_id="s-calls")
    assert r.status_code == 200, r.text
    wid = r.json()["worker"]
    p = httpx.post(f"{u}/session/s-calls/prompt", json={"frame_index": N, "prompts": [{"type": "text", "text": "square"}]}, timeout=B)
    assert p.status_code == 422 and "outside the video" in p.json()["error"]["message"]
    p = httpx.post(f"{u}/session/s-calls/prompt", json={"frame_index": 0, "prompts": []}, timeout=B)
    assert p.status_code == 422
    p = httpx.post(f"{u}/prompt/add", json={"session_id": "s-calls", "frame_index": 2, "text": "square"}, timeout=B)
    assert p.status_code == 503 and wid in p.json()["error"]["message"]  # decode-only session: no video model
    assert httpx.post(f"{u}/session/s-calls/propagate", json={"direction": "sideways"}, timeout=B).status_code == 422
    assert httpx.post(f"{u}/propagate", json={"session_id": "s-calls", "start_frame_index": 99}, timeout=B).status_code == 422
    assert httpx.delete(f"{u}/session/s-calls/object/7", timeout=B).status_code == 404
    rs = httpx.post(f"{u}/session/s-calls/reset", timeout=B)
    assert rs.status_code == 200 and rs.json()["worker"] == wid and rs.json()["reset"] is True
    assert httpx.get(f"{u}/session/nope/status", timeout=B).status_code == 404
    with ws_connect(stack.url.replace("http://", "ws://") + "/api/v1/video/ws/propagate/nope", open_timeout=B) as ws:
        ws.send(json.dumps({"direction": "forward"}))
        err = json.loads(ws.recv(timeout=B))
    assert err["type"] == "error" and err["error"]["status"] == 404
    assert httpx.get(f"{u}/session/bad%20id/status", timeout=B).status_code == 422
    assert _close(stack, "s-calls").status_code == 200
    # bad videos and paths
    assert httpx.post(f"{u}/session/start", json={"video_path": "/etc/passwd"}, timeout=B).status_code == 403
    assert httpx.post(f"{u}/session/start", json={"resource_path": str(videos / ".." / "x.mp4")}, timeout=B).status_code == 403
    assert _start(stack, "missing.mp4", videos).status_code == 400
    g = _start(stack, "garbage.mp4", videos)
    assert g.status_code == 400 and g.json()["error"]["code"] == "unreadable_video", g.text
    big = _start(stack, "long.mp4", videos)  # 30 frames, MAX_VIDEO_FRAMES=20
    assert big.status_code == 413 and "MAX_VIDEO_FRAMES" in big.json()["error"]["message"]
    assert httpx.post(f"{u}/session/start", json={}, timeout=B).status_code == 422
    assert httpx.get(u + "/sessions", timeout=B).json()["count"] == 0  # failed starts leave no record
    _settle(stack, {w.name: 0 for w in stack.workers})


def test_upload_capacity_and_close_frees_slot(stack, videos: Path) -> None:
    data_dir = Path(stack.env["STORAGE_URL"].removeprefix("file://"))
    u = stack.url + "/api/v1/video/session/upload"
    bad = httpx.post(u, files={"file": ("notes.txt", b"hello", "text/plain")}, timeout=B)
    assert bad.status_code == 400 and "unsupported video format" in bad.json()["error"]["message"]
    video = (videos / "shapes.mp4").read_bytes()
    r = httpx.post(u, files={"file": ("clip.mp4", video, "video/mp4")}, timeout=B)
    assert r.status_code == 200, r.text
    up_sid = r.json()["session_id"]
    assert r.json()["video_info"]["total_frames"] == N
    stored = data_dir / "default" / "videos" / up_sid / "video.mp4"
    assert stored.read_bytes() == video
    sids = [up_sid]
    for _ in range(3):  # 2 workers x MAX_SESSIONS_PER_WORKER=2
        _settle(stack, _expected(stack, sids))
        s = _start(stack, videos=videos)
        assert s.status_code == 200, s.text
        sids.append(s.json()["session_id"])
    _settle(stack, {w.name: 2 for w in stack.workers})
    full = _start(stack, videos=videos)
    assert full.status_code == 503 and int(full.headers["Retry-After"]) > 0, full.text
    c = _close(stack, up_sid)
    assert c.status_code == 200 and c.json()["upload_deleted"] is True
    assert not stored.exists() and not stored.parent.exists()
    sids.remove(up_sid)
    _settle(stack, _expected(stack, sids))
    again = _start(stack, videos=videos)  # the freed slot is usable
    assert again.status_code == 200, again.text
    sids.append(again.json()["session_id"])
    for sid in sids:
        assert _close(stack, sid).status_code == 200
    _settle(stack, {w.name: 0 for w in stack.workers})


def _expected(stack, sids: list[str]) -> dict[str, int]:
    counts = {w.name: 0 for w in stack.workers}
    for sid in sids:
        counts[stack.redis.hget(session_key("default", sid), "worker").decode()] += 1
    return counts


def test_killed_worker_gives_410(stack, videos: Path) -> None:
    """Last in the module: it kills one of the two workers."""
    r = _start(stack, videos=videos, session_id="s-doomed")
    assert r.status_code == 200, r.text
    victim = next(w for w in stack.workers if w.name == r.json()["worker"])
    victim.kill()
    t_end = time.time() + 15  # until its heartbeat is stale (WORKER_HEARTBEAT_S=1: 3 s) and the API has polled
    while time.time() < t_end:
        hb = stack.redis.hget(f"tf:worker:{victim.name}", "heartbeat")
        if hb is None or time.time() - float(hb) > 3.5:
            break
        time.sleep(0.1)
    time.sleep(0.3)
    t_end = time.time() + 20
    st = None
    while time.time() < t_end:
        st = httpx.get(f"{stack.url}/api/v1/video/session/s-doomed/status", timeout=B)
        if st.status_code == 410:
            break
        time.sleep(0.2)
    assert st is not None and st.status_code == 410, st.text if st is not None else ""
    assert victim.name in st.json()["error"]["message"] and "start a new session" in st.json()["error"]["message"]
    assert httpx.get(f"{stack.url}/api/v1/video/session/s-doomed/status", timeout=B).status_code == 404  # the record is gone with it
    survivor = next(w for w in stack.workers if w.name != victim.name)
    r2 = _start(stack, videos=videos)  # new sessions go to the live worker
    assert r2.status_code == 200 and r2.json()["worker"] == survivor.name, r2.text
    assert _close(stack, r2.json()["session_id"]).status_code == 200


def test_idle_sessions_are_reaped(redis_server, tmp_path: Path) -> None:
    """SESSION_TTL_SECONDS: the reaper closes an idle session, deletes its upload and its record."""
    import types

    import redis as redis_lib

    from storage.blob import open_store
    from tasks.settings import Settings
    from workers.runners.sam3_video import Session, SessionManager

    settings = Settings(session_ttl_seconds=5, max_sessions_per_worker=2, storage_url=f"file://{tmp_path}")
    r = redis_lib.Redis(port=redis_server.port, db=0)
    store = open_store(settings.storage_url, None)
    beats: list[int] = []
    svc = types.SimpleNamespace(worker_id="w-reap", store=store, r=r, settings=settings, beat=lambda: beats.append(1))
    mgr = SessionManager(settings, svc, None)
    frames = [np.zeros((H, W, 3), np.uint8)] * 3
    for sid, used in ((f"idle-{uuid.uuid4().hex}", 100.0), (f"busy-{uuid.uuid4().hex}", 104.0)):
        store.put(f"default/videos/{sid}/video.mp4", b"x")
        r.hset(session_key("default", sid), mapping={"worker": "w-reap"})
        mgr.sessions[("default", sid)] = Session(sid, "default", "key:x", frames, 12.0, upload=f"default/videos/{sid}/", last_used=used)
    idle, busy = sorted(sid for _, sid in mgr.sessions)[1], sorted(sid for _, sid in mgr.sessions)[0]
    assert mgr.count == 2 and mgr.sessions[("default", busy)].info()["total_frames"] == 3
    assert mgr.reap(now=106.0) == [idle]  # 6 s idle > 5 s; the other 2 s
    assert mgr.count == 1 and ("default", busy) in mgr.sessions and beats == [1]
    assert not store.list(f"default/videos/{idle}/") and store.list(f"default/videos/{busy}/")
    assert not r.exists(session_key("default", idle)) and r.exists(session_key("default", busy))
    assert mgr.reap(now=110.0) == [busy] and mgr.count == 0 and mgr.closed_idle == 2
