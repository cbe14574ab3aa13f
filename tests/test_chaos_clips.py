"""V-JEPA 2 multi-clip jobs when a clip never reaches the model: the job still finishes.

A clip whose message kills its worker every time is dead-lettered after MAX_DELIVERIES, and a
clip that fails before the model (input refused, deadline passed) is dropped unrun; either way
the worker records it with its parent job like a clip that failed in the model, so the job
ends `succeeded` with that clip's error in the timeline (as a shard job does with a dead
shard) instead of staying `running` until its TTL. And a video job whose input URI is out of
the tenant's reach fails on the worker with 403 `input_forbidden` before anything is read.

Real parts: Redis, two vjepa2 worker processes on a tiny checkpoint, the API. The poison is
injected by the tests' fault hook (tests/helpers/faults: TRIFECTA_CRASH_CLIP=2 makes clip 2 of
any multi-clip job exit its worker), never by production code. MAX_DELIVERIES=1 keeps it to one death per poison.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path

import httpx
import orjson
import pytest

from tasks import clips as clipc
from tasks import keys
from tasks.queuekeys import QueueKeys
from tasks.schemas import InferRequest
from tasks.wire import build_message
from tests.conftest import wait_job
from tests.helpers import faults
from tests.helpers.clips import frames_rgb, png, write_video
from tests.helpers.stacks import tiny_checkpoint

POISON = 2


@pytest.fixture(scope="module")
def stack(make_stack, tmp_path_factory: pytest.TempPathFactory):
    ckpt = tiny_checkpoint("vjepa2", tmp_path_factory.mktemp("ckpt") / "vjepa2")
    env = {
        "VJEPA2_CHECKPOINT": str(ckpt),
        "VIDEO_CHUNK_CLIPS": "2",
        "MAX_BATCH_SIZE": "1",
        "MAX_CONCURRENCY_PER_GPU": "1",
        "MAX_DELIVERIES": "1",
        "VISIBILITY_TIMEOUT_S": "2",
        **faults.env(TRIFECTA_CRASH_CLIP=str(POISON)),
    }
    return make_stack(models=["vjepa2", "vjepa2"], env=env)


def _deadletters(stack) -> list[dict]:
    return [orjson.loads(x) for x in stack.redis.lrange(keys.DEADLETTER, 0, -1)]


def test_video_job_with_a_poison_clip_finishes_with_that_clip_dead_lettered(stack, tmp_path: Path) -> None:
    path = tmp_path / "poison.mp4"
    write_video(path)  # 70 frames: clips 0..3 back to back at stride 16, and clip 4 ending on the last frame
    r = httpx.post(stack.url + "/v1/jobs", data={"model": "vjepa2", "kind": "video", "params": json.dumps({"stride": 16})}, files={"file": ("poison.mp4", path.read_bytes(), "video/mp4")}, timeout=30)
    assert r.status_code == 202, r.text
    jid = r.json()["job_id"]
    j = wait_job(stack.url, jid, 90)  # before the fix: `running` until RESULT_TTL_SECONDS
    assert j["status"] == "succeeded", j
    meta = j["result"]["meta"]
    assert (meta["clips"], meta["clips_failed"]) == (5, 1), meta
    by = {c["index"]: c for c in meta["clip_results"]}
    assert sorted(by) == [0, 1, 2, 3, 4]
    assert by[POISON]["error"]["code"] == "dead_lettered" and "predictions" not in by[POISON], by[POISON]
    assert (by[POISON]["start_frame"], by[POISON]["end_frame"]) == (32, 47)
    assert all(len(by[i]["predictions"]) == 5 and "error" not in by[i] for i in (0, 1, 3, 4)), by
    # the timeline in storage says the same
    tl = httpx.get(stack.url + f"/v1/jobs/{jid}/result", timeout=10).json()
    assert [c["index"] for c in tl["clips"]] == [0, 1, 2, 3, 4]
    assert tl["clips"][POISON]["error"]["code"] == "dead_lettered"
    # one worker died (once), the clip was dead-lettered by name, the other worker lives on
    assert sum(not w.alive() for w in stack.workers) == 1, [w.tail() for w in stack.workers]
    assert [d["id"] for d in _deadletters(stack)] == [clipc.child_id(jid, POISON)]
    assert not stack.redis.exists(keys.job(clipc.child_id(jid, POISON)))  # the clip records are cleaned up with the job


def _enqueue_frames_job(stack, tenant: str, inputs: list[dict], deadlines: list[float]) -> str:
    """A frames job of len(inputs) clips, queued the way the API queues one (tasks.clips)."""
    jid = uuid.uuid4().hex
    now = time.time()
    reqs = [
        InferRequest.model_validate(
            {
                "id": clipc.child_id(jid, i),
                "model": "vjepa2",
                "input": inp,
                "params": {"parent": jid, "index": i, "f0": 16 * i, "f1": 16 * i + 15, "top_k": 3},
                "format": "png",
                "deadline": dl,
                "tenant": tenant,
                "kind": "job",
                "out_prefix": f"{tenant}/jobs/{jid}/_clips/{i}",
                "created": now,
            }
        )
        for i, (inp, dl) in enumerate(zip(inputs, deadlines, strict=True))
    ]
    doc = {"id": jid, "model": "vjepa2", "kind": "job", "tenant": tenant, "created_at": now, "params": {}, "input": {"kind": "frames"}, "progress": {"done": 0, "total": len(reqs)}}
    state = {"kind": "frames", "tenant": tenant, "top_k": 3, "per_clip": 16, "fps": "", "width": 64, "height": 48, "total": len(reqs), "emitted": len(reqs), "frames": 16 * len(reqs)}
    pipe = stack.redis.pipeline(transaction=False)
    clipc.queue_parent(pipe, doc, state, 600)
    clipc.queue_children(pipe, reqs, 600, QueueKeys())  # the stack runs kombu's default key names (no BROKER_GLOBAL_KEYPREFIX)
    pipe.execute()
    return jid


def test_clips_dropped_before_the_model_are_recorded_and_the_job_finishes(stack) -> None:
    clip = clipc.pack_clip([png(f) for f in frames_rgb(7)], 64, 48, "RGB")
    good = {"b64": base64.b64encode(clip).decode(), "size": len(clip)}
    stolen = {"uri": "key:other-tenant/jobs/abc/_in/clip0", "size": 10}  # another tenant's staged clip
    later, past = time.time() + 600, time.time() - 1
    jid = _enqueue_frames_job(stack, "default", [good, stolen, good], [later, later, past])
    j = wait_job(stack.url, jid, 60)
    assert j["status"] == "succeeded", j
    by = {c["index"]: c for c in j["result"]["meta"]["clip_results"]}
    assert j["result"]["meta"]["clips_failed"] == 2
    assert len(by[0]["predictions"]) == 3 and "error" not in by[0]
    assert by[1]["error"]["code"] == "input_forbidden" and "other-tenant" in by[1]["error"]["message"], by[1]
    assert by[2]["error"]["code"] == "deadline_exceeded", by[2]
    # every clip dropped: the job fails with the first clip's reason, not `running` forever
    jid = _enqueue_frames_job(stack, "default", [stolen, good], [later, past])
    j = wait_job(stack.url, jid, 60)
    assert j["status"] == "failed" and j["error"]["code"] == "input_forbidden" and j["error"]["clips_failed"] == 2, j


def test_video_job_with_another_tenants_input_fails_on_the_worker_with_403(stack, tmp_path: Path) -> None:
    """The decode task checks the job's video URI for the job's tenant before it opens anything."""
    path = tmp_path / "theirs.mp4"
    write_video(path, 20)
    theirs = stack.tmp / "data" / "tenantB" / "jobs" / "x" / "_in"
    theirs.mkdir(parents=True)
    (theirs / "video").write_bytes(path.read_bytes())
    for uri in ("key:tenantB/jobs/x/_in/video", f"file://{path}", "key:default/../tenantB/jobs/x/_in/video"):
        jid = uuid.uuid4().hex
        now = time.time()
        doc = {"id": jid, "model": "vjepa2", "kind": "job", "tenant": "default", "created_at": now, "params": {}, "input": {"kind": "video"}}
        state = {"kind": "video", "uri": uri, "tenant": "default", "stride": 16, "frame_step": 1, "top_k": 3, "per_clip": 16, "deadline": now + 600, "total": -1, "emitted": 0, "frames": 0}
        q = keys.shared_queue("vjepa2")
        pipe = stack.redis.pipeline(transaction=False)
        clipc.queue_parent(pipe, doc, state, 600)
        pipe.lpush(q, build_message(clipc.TASK_VIDEO, f"{jid}:0", {"job_id": jid, "chunk": 0, "first_clip": 0, "start_frame": 0, "start_pts": None}, q))
        pipe.execute()
        j = wait_job(stack.url, jid, 60)
        assert j["status"] == "failed" and j["error"]["code"] == "input_forbidden" and j["error"]["status"] == 403, (uri, j)
        assert stack.redis.hget(clipc.state_key(jid), "fps") is None  # the video was never opened
