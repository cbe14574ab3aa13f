"""Sync calls on S3 storage do not round-trip through S3 (issue 19, item 5).

Every storage request the stacks make is counted at the wire: the S3 endpoint the API and the
workers are given is a counting proxy (client/s3count.py) in front of moto's server over HTTP.
A sync call's input over INLINE_INPUT_BYTES waits in Redis (SYNC_REDIS_INPUT_MAX_BYTES) and its
mask rides in the worker's reply (SYNC_REPLY_INLINE_BYTES): the one storage request left is the
mask's PUT for the record, which the worker makes after the reply is out. Every sync route
takes that path (api.routes.sync.SyncInputs): `/run_*`, Mask2Former `/segment` and
`/segment-batch`, SAM3 `/api/v1/image/segment` and V-JEPA 2 `/api/v1/infer`, the torch families
on the project's tiny random-init checkpoints.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import httpx
import numpy as np
import orjson
import pytest

from client.s3count import S3Counter
from storage import codecs
from tasks import jobstore, keys, wire
from tests.conftest import IMAGES, make_bucket, wait_job
from tests.helpers.stacks import tiny_checkpoint

BUCKET = "sync-s3"
PREFIX = "trifecta"
PHOTO = (IMAGES / "chelsea.png").read_bytes()  # 240 KB: over INLINE_INPUT_BYTES (64 KiB)


@pytest.fixture(scope="module")
def counter(moto_s3: str) -> Iterator[S3Counter]:
    make_bucket(moto_s3, BUCKET)
    with S3Counter(moto_s3) as c:
        yield c


@pytest.fixture(scope="module")
def s3_stack(make_stack, counter: S3Counter):
    return make_stack(models=["textmask", "echo"], env={"S3_ENDPOINT_URL": counter.url}, storage=f"s3://{BUCKET}/{PREFIX}")


@pytest.fixture(scope="module")
def file_stack(make_stack):
    return make_stack(models=["textmask"])


@pytest.fixture(scope="module")
def s3_readback_stack(make_stack, counter: S3Counter):
    """Masks never ride in the reply (SYNC_REPLY_INLINE_BYTES=0): the API reads them back from storage."""
    return make_stack(models=["simulated"], env={"S3_ENDPOINT_URL": counter.url, "SYNC_REPLY_INLINE_BYTES": "0", "SIM_BATCH_MS": "0", "SIM_IMAGE_MS": "0"}, storage=f"s3://{BUCKET}/{PREFIX}")


def _object(moto_s3: str, key: str) -> bytes:
    return boto3.client("s3", endpoint_url=moto_s3).get_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}")["Body"].read()


def _settled(stack, job_id: str) -> dict:
    """The sync request's record once it is finished (the worker records it after the reply)."""
    return wait_job(stack.url, job_id, timeout=30)


def test_sync_call_on_s3_makes_one_storage_request_and_answers_as_file(s3_stack, file_stack, counter: S3Counter, moto_s3: str) -> None:
    assert len(PHOTO) > 64 << 10
    ref = httpx.post(file_stack.url + "/run_textmask", content=PHOTO, headers={"Content-Type": "image/png"}, timeout=60)
    assert ref.status_code == 200, ref.text
    for _ in range(2):  # the first call and a warm one count the same
        mark = counter.mark()
        r = httpx.post(s3_stack.url + "/run_textmask", content=PHOTO, headers={"Content-Type": "image/png"}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.content == ref.content  # the same mask bytes as on file:// storage
        mask = codecs.decode_packbits(r.content)
        assert mask.shape == (300, 451) and mask.sum() > 0
        jid = r.headers["X-Job-Id"]
        j = _settled(s3_stack, jid)
        assert j["status"] == "succeeded", j
        (out,) = j["result"]["outputs"]
        assert out["path"] == f"default/jobs/{jid}/mask.packbits" and not out.get("inline") and "data" not in out
        # the call's storage requests: the mask's PUT for the record, and nothing else
        # (no input PUT/GET/LIST/DELETE, no mask GET back)
        reqs = [(m, p) for m, p, _q, _t0, _t1 in counter.since(mark)]
        assert reqs == [("PUT", f"/{BUCKET}/{PREFIX}/default/jobs/{jid}/mask.packbits")], reqs
        assert _object(moto_s3, out["path"]) == r.content  # the record's mask exists, byte for byte
        assert not s3_stack.redis.exists(keys.sync_input(jid))  # the worker deleted the input it read


def test_too_large_reply_falls_back_to_storage(s3_readback_stack, counter: S3Counter, moto_s3: str) -> None:
    mark = counter.mark()
    r = httpx.post(s3_readback_stack.url + "/run_simulated", content=PHOTO, headers={"Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 200, r.text
    jid = r.headers["X-Job-Id"]
    key = f"default/jobs/{jid}/mask.packbits"
    reqs = [(m, p) for m, p, _q, _t0, _t1 in counter.since(mark)]
    # stored before the reply (the API needs it), then read back by the API
    assert reqs == [("PUT", f"/{BUCKET}/{PREFIX}/{key}"), ("GET", f"/{BUCKET}/{PREFIX}/{key}")], reqs
    assert _object(moto_s3, key) == r.content
    assert codecs.decode_packbits(r.content).shape == (300, 451)
    assert _settled(s3_readback_stack, jid)["status"] == "succeeded"


def test_large_sync_input_waits_in_redis_with_the_deadline_as_ttl_then_is_deleted(s3_stack, counter: S3Counter) -> None:
    """An echo call that sleeps 1.5 s after reading its input: the input's key is seen while it
    waits, with a TTL of the request's deadline (timeout 5 s + SYNC_GRACE_S 60 s + a 5 s margin)."""
    seen: list[tuple[bytes, int]] = []
    stop = threading.Event()

    def watch() -> None:
        r = s3_stack.redis
        while not stop.is_set() and not seen:
            for k in r.scan_iter(match=f"{keys.PREFIX}:in:*"):
                seen.append((k, r.pttl(k)))
            time.sleep(0.005)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    mark = counter.mark()
    r = httpx.post(s3_stack.url + "/run_echo?sleep_ms=1500&timeout=5", content=PHOTO, headers={"Content-Type": "application/octet-stream"}, timeout=30)
    stop.set()
    t.join(5)
    assert r.status_code == 200, r.text
    import hashlib

    body = r.json()
    assert body["bytes"] == len(PHOTO) and body["digest"] == hashlib.blake2b(PHOTO, digest_size=8).hexdigest()  # the worker read exactly the bytes sent
    jid = body["job_id"]
    assert seen and seen[0][0] == keys.sync_input(jid).encode(), seen
    assert 60_000 < seen[0][1] <= 70_000, seen  # TTL tied to the deadline, not to SYNC_RESULT_TTL_S
    assert not s3_stack.redis.exists(keys.sync_input(jid))  # deleted with the worker's FINISH
    assert counter.since(mark) == []  # echo stores nothing: no storage request at all


def test_expired_redis_input_fails_with_gone_and_the_worker_still_answers(s3_stack) -> None:
    """A message whose input is no longer in Redis (its TTL passed) fails with 410 `gone`, clearly."""
    jid = "e" * 32
    now = time.time()
    req = {
        "id": jid, "model": "echo", "input": {"uri": "redis:", "size": 1234}, "deadline": now + 60, "reply": None, "tenant": "default",
        "kind": "job", "out_prefix": f"default/jobs/{jid}", "created": now,
    }
    r = s3_stack.redis
    r.hset(keys.job(jid), mapping=jobstore.new_record({"id": jid, "model": "echo", "kind": "job", "tenant": "default", "created_at": now, "params": {}}))
    r.expire(keys.job(jid), 600)
    r.lpush(keys.shared_queue("echo"), wire.build_message(keys.TASK_INFER, jid, {"req": req}, keys.shared_queue("echo")))
    j = wait_job(s3_stack.url, jid, timeout=30)
    assert j["status"] == "failed" and j["error"]["code"] == "gone", j
    assert "no longer held in Redis" in j["error"]["message"]
    ok = httpx.post(s3_stack.url + "/run_echo", content=b"x" * 100, timeout=30)
    assert ok.status_code == 200 and ok.json()["bytes"] == 100


def test_redis_input_over_the_limit_is_staged_in_storage(make_stack, counter: S3Counter) -> None:
    """SYNC_REDIS_INPUT_MAX_BYTES below the image: it is staged in storage as before (PUT, GET by
    the worker, LIST + DELETE after the reply), and the answer is the same."""
    st = make_stack(models=["echo"], env={"S3_ENDPOINT_URL": counter.url, "SYNC_REDIS_INPUT_MAX_BYTES": str(100 << 10)}, storage=f"s3://{BUCKET}/{PREFIX}")
    mark = counter.mark()
    r = httpx.post(st.url + "/run_echo", content=PHOTO, headers={"Content-Type": "application/octet-stream"}, timeout=30)
    assert r.status_code == 200 and r.json()["bytes"] == len(PHOTO), r.text
    jid = r.json()["job_id"]
    t_end = time.time() + 10
    while time.time() < t_end and "POST" not in [m for m, *_ in counter.since(mark)]:
        time.sleep(0.05)  # the staged input's delete runs in the background
    methods = [m for m, p, *_ in counter.since(mark)]
    assert methods == ["PUT", "GET", "GET", "POST"], counter.since(mark)  # PUT, worker GET, LIST, DeleteObjects
    assert counter.since(mark)[0][1] == f"/{BUCKET}/{PREFIX}/default/jobs/{jid}/_in/input"
    assert orjson.loads(r.content)["digest"]


# ---------------------------------------------------------------- the torch families' sync routes
@pytest.fixture(scope="module")
def torch_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    pytest.importorskip("torch")
    tmp = tmp_path_factory.mktemp("tiny")
    ckpts = {f"{env}_CHECKPOINT": str(tiny_checkpoint(name, tmp / name)) for env, name in (("M2F", "mask2former"), ("SAM3", "sam3"), ("VJEPA2", "vjepa2"))}
    return {**ckpts, "M2F_LONG_SIDE": "256", "MAX_BATCH_SIZE": "1", "MAX_PROMPTS": "8"}


TORCH_MODELS = ["mask2former", "sam3", "vjepa2"]


@pytest.fixture(scope="module")
def torch_s3(make_stack, counter: S3Counter, torch_env: dict[str, str]):
    return make_stack(models=TORCH_MODELS, env={**torch_env, "S3_ENDPOINT_URL": counter.url}, storage=f"s3://{BUCKET}/{PREFIX}")


@pytest.fixture(scope="module")
def torch_file(make_stack, torch_env: dict[str, str]):
    """The reference on file://, its inputs staged in storage as before (SYNC_REDIS_INPUT_MAX_BYTES=0):
    the same answers either way, and the staged inputs are deleted once answered."""
    return make_stack(models=TORCH_MODELS, env={**torch_env, "SYNC_REDIS_INPUT_MAX_BYTES": "0"})


def _frames() -> list[str]:
    """16 raw RGB frames, 80 x 60, of a real photo panning: a 230 KB clip (over INLINE_INPUT_BYTES)."""
    from PIL import Image

    im = np.asarray(Image.open(IMAGES / "astronaut.png").convert("RGB").resize((160, 60)))
    return [base64.b64encode(np.ascontiguousarray(im[:, 5 * i : 5 * i + 80]).tobytes()).decode() for i in range(16)]


SAM3_BODY = {"image": base64.b64encode(PHOTO).decode(), "prompts": [{"type": "text", "text": "cat"}, {"type": "box", "box": [0.5, 0.5, 0.4, 0.4], "label": True}], "confidence_threshold": 0.0}
VJEPA2_BODY = {"frames": _frames(), "width": 80, "height": 60, "format": "RGB"}


def _no_timing(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in ("inference_time_ms", "clip_id")}


# route -> (the call, the answer to compare across storages)
TORCH_ROUTES: dict[str, tuple[Callable[[str], httpx.Response], Callable[[httpx.Response], object]]] = {
    "m2f-segment": (lambda url: httpx.post(url + "/segment", content=PHOTO, headers={"Content-Type": "image/png", "X-Mask": "wall"}, timeout=120), lambda r: r.content),
    "m2f-segment-batch": (lambda url: httpx.post(url + "/segment-batch", content=PHOTO, headers={"Content-Type": "image/png"}, timeout=120), lambda r: r.json()),
    "sam3-image": (lambda url: httpx.post(url + "/api/v1/image/segment", json=SAM3_BODY, timeout=120), lambda r: _no_timing(r.json())),
    "vjepa2-infer": (lambda url: httpx.post(url + "/api/v1/infer", json=VJEPA2_BODY, timeout=120), lambda r: _no_timing(r.json())),
}


@pytest.mark.parametrize("route", list(TORCH_ROUTES))
def test_torch_sync_routes_on_s3_wait_on_no_storage_request_and_answer_as_file(route: str, torch_s3, torch_file, counter: S3Counter, moto_s3: str) -> None:
    call, answer = TORCH_ROUTES[route]
    ref = call(torch_file.url)
    assert ref.status_code == 200, ref.text
    jref = ref.headers["X-Job-Id"]
    # the reference's input was staged on file:// and is deleted once answered
    assert not list((Path(torch_file.env["STORAGE_URL"].removeprefix("file://")) / "default" / "jobs" / jref).glob("_in/*"))
    mark = counter.mark()
    # every storage request waits at the proxy until the answer is in: an answer that needed one
    # (an input PUT or GET, an output GET) could not come back; at most the worker's first
    # deferred output PUT (made after its reply) can have arrived meanwhile
    with counter.hold():
        r = call(torch_s3.url)
        on_path = counter.waiting()
    assert r.status_code == 200, r.text
    jid = r.headers["X-Job-Id"]
    assert len(on_path) <= 1 and all(m == "PUT" and p.startswith(f"/{BUCKET}/{PREFIX}/default/jobs/{jid}/") and "/_in/" not in p for m, p in on_path), on_path
    got = answer(r)
    assert got == answer(ref)  # the same answer as on file:// storage
    if route == "m2f-segment":
        assert codecs.decode_png(r.content).shape == (300, 451)
    elif route == "m2f-segment-batch":
        assert len(got) == 4 and all(codecs.decode_png(base64.b64decode(v)).shape == (300, 451) for v in got.values())
    elif route == "sam3-image":
        assert got["num_masks"] > 0 and got["image_size"] == {"width": 451, "height": 300}
    else:
        assert len(got["predictions"]) == 5
    j = _settled(torch_s3, jid)  # the deferred PUTs land, then FINISH records it
    assert j["status"] == "succeeded", j
    outs = j["result"].get("outputs") or []
    # the call's storage requests, all of them: one PUT per output for the record, after the reply
    # (none for V-JEPA 2, whose answer is its meta); no input PUT/GET/LIST/DELETE, no output GET
    reqs = sorted((m, p) for m, p, *_ in counter.since(mark))
    assert reqs == sorted(("PUT", f"/{BUCKET}/{PREFIX}/{o['path']}") for o in outs), reqs
    assert (len(outs) > 0) == (route != "vjepa2-infer")
    for o in outs:
        assert not o.get("inline") and "data" not in o and len(_object(moto_s3, o["path"])) == o["bytes"]
    assert not torch_s3.redis.exists(keys.sync_input(jid))  # the worker deleted the input it read
