"""WebDataset shard jobs end to end: API → `<model>:shards` → two real textmask workers → storage.

Shards are built here from the real photos (with drawn text) and synthetic images, read
from file:// (under ALLOWED_INPUT_ROOTS) and from moto's S3, written to the file and the
S3 backends; hostile tars, cancel, idempotency, a multipart upload, the sync tar batch
layout and its 413, and a worker SIGKILLed mid-shard.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import boto3
import httpx
import numpy as np
import pytest
from PIL import Image

from storage import codecs
from tests.conftest import make_bucket, photo, png_bytes, wait_job, with_text

BIG = 1_500_000  # MAX_SAMPLE_BYTES of the file stack


# ---------------------------------------------------------------- building shards
def tar_bytes(members: list[tuple[str, bytes] | tarfile.TarInfo]) -> bytes:
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                ti = tarfile.TarInfo(m[0])
                ti.size = len(m[1])
                tf.addfile(ti, io.BytesIO(m[1]))
    return bio.getvalue()


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = kind, linkname
    return ti


def synthetic(w: int, h: int, seed: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    a = np.zeros((h, w, 3), np.uint8)
    a[:] = rng.integers(0, 255, 3, dtype=np.uint8)
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    a[y : y + h // 3, x : x + w // 3] = rng.integers(0, 255, 3, dtype=np.uint8)
    return png_bytes(Image.fromarray(a), fmt)


def good_shard(i: int) -> tuple[bytes, dict[str, tuple[int, int]], dict[str, np.ndarray]]:
    """8 samples: 2 photos with text (+ a .cls member), 6 synthetic (png and jpg, odd sizes)."""
    members: list[tuple[str, bytes]] = []
    shapes: dict[str, tuple[int, int]] = {}
    gts: dict[str, np.ndarray] = {}
    for j, name in enumerate(("chelsea.png", "coffee.png")):
        data, gt = with_text(name)
        key = f"s{i}/text{j}"
        members += [(f"{key}.png", data), (f"{key}.cls", b"1")]
        shapes[key], gts[key] = gt.shape, gt
    for j in range(6):
        w, h = 40 + 13 * j + i, 30 + 7 * j
        key = f"s{i}/syn{j:02d}"
        fmt = "JPEG" if j % 2 else "PNG"
        members.append((f"{key}.{'jpg' if fmt == 'JPEG' else 'png'}", synthetic(w, h, 100 * i + j, fmt)))
        shapes[key] = (h, w)
    return tar_bytes(members), shapes, gts


def read_tar(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        names = tf.getnames()
        assert len(names) == len(set(names)), "no member twice"
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}



def submit(url: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/jobs", json=body, timeout=30, **kw)


# ---------------------------------------------------------------- the file-backend stack
@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("shards")
    (d / "in").mkdir()
    return d / "in"


@pytest.fixture(scope="module")
def stack(make_stack, shard_dir: Path):
    env = {
        "ALLOWED_INPUT_ROOTS": str(shard_dir), "VISIBILITY_TIMEOUT_S": "5", "TEXTMASK_LIMIT_SIDE_LEN": "320", "MAX_SYNC_BATCH": "4",
        "MAX_SAMPLE_BYTES": str(BIG), "MAX_SAMPLES_PER_SHARD": "120",
    }
    return make_stack(models=["textmask", "textmask"], env=env)


@pytest.fixture(scope="module")
def good(shard_dir: Path) -> dict:
    expect: dict = {"shapes": {}, "gts": {}}
    for i in range(3):
        data, shapes, gts = good_shard(i)
        (shard_dir / f"good-{i:03d}.tar").write_bytes(data)
        expect["shapes"].update(shapes)
        expect["gts"].update(gts)
    return expect


def storage_root(stack) -> Path:
    return Path(stack.env["STORAGE_URL"].removeprefix("file://"))


def test_shard_job_fans_out_over_two_workers_and_writes_webdataset_shards(stack, shard_dir: Path, good: dict) -> None:
    r = submit(stack.url, {"model": "textmask", "input": {"shards": [f"file://{shard_dir}/good-{{000..002}}.tar"]}, "params": {"format": "png"}})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    st = wait_job(stack.url, job_id)
    assert st["status"] == "succeeded", st
    p = st["progress"]
    assert (p["shards_total"], p["shards_done"], p["samples_total"], p["samples_done"], p["samples_failed"]) == (3, 3, 24, 24, 0)
    assert p["samples_total_exact"] is True and p["throughput"] > 0 and p["eta_s"] == 0
    res = st["result"]
    outs = res["outputs"]
    assert [o["key"] for o in outs] == ["00000-good-000.tar", "00001-good-001.tar", "00002-good-002.tar", "manifest.json"]
    assert {s["worker"] for s in res["shards"]} == {w.name for w in stack.workers}, "both workers took shards"
    root = storage_root(stack)
    for i, o in enumerate(outs[:3]):
        assert o["format"] == "tar" and o["path"] == f"default/jobs/{job_id}/shards/{o['key']}"
        data = (root / o["path"]).read_bytes()
        assert o["bytes"] == len(data)
        members = read_tar(data)
        keys = sorted({n.split(".", 1)[0] for n in members})
        assert keys == sorted(k for k in good["shapes"] if k.startswith(f"s{i}/")), "same __key__s as the input"
        assert set(members) == {f"{k}.{e}" for k in keys for e in ("png", "json")}
        for k in keys:
            mask = codecs.decode_png(members[f"{k}.png"])
            meta = json.loads(members[f"{k}.json"])
            assert mask.shape == good["shapes"][k] and meta["shape"] == list(mask.shape)
            assert meta["__key__"] == k and meta["model"] == "textmask" and meta["format"] == "png"
            assert meta["foreground_pixels"] == int(mask.sum())
            if k in good["gts"]:
                gt = good["gts"][k]
                assert mask.sum() > 300 and mask[gt].sum() / mask.sum() > 0.8, "the mask lies on the drawn text"
        # the API streams the same bytes
        got = httpx.get(f"{stack.url}/v1/jobs/{job_id}/result", params={"key": o["key"]}, timeout=30)
        assert got.status_code == 200 and got.content == data
    manifest = json.loads((root / outs[3]["path"]).read_bytes())
    assert manifest["counts"] == {"shards": 3, "samples": 24, "done": 24, "failed": 0}
    assert sorted(s["key"] for s in manifest["samples"]) == sorted(good["shapes"])
    assert all(s["status"] == "ok" and s["error"] is None for s in manifest["samples"])
    # nothing but the job's own prefix was written
    written = {str(f.relative_to(root)) for f in root.rglob("*") if f.is_file()}
    assert {w for w in written if job_id in w} == {o["path"] for o in outs} | {f"default/jobs/{job_id}/shards/{o['key'].removesuffix('.tar')}.manifest.json" for o in outs[:3]}


def test_cli_submit_waits_and_prints_where_outputs_are(stack, shard_dir: Path, good: dict) -> None:
    pattern = f"file://{shard_dir}/good-{{000..001}}.tar"
    out = subprocess.run(
        [sys.executable, "-m", "client.cli", "submit", "--url", stack.url, "--shards", pattern, "--model", "textmask", "--format", "rle", "--wait"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip().splitlines()[-1]
    job_id, status = line.split()[:2]
    assert status == "succeeded"
    assert f"/v1/jobs/{job_id}/result?key=00000-good-000.tar" in line and "key=manifest.json" in line
    members = read_tar((storage_root(stack) / f"default/jobs/{job_id}/shards/00001-good-001.tar").read_bytes())
    rle = json.loads(members["s1/syn03.rle.json"])
    assert codecs.decode_rle(rle).shape == good["shapes"]["s1/syn03"]


def test_hostile_tars_are_recorded_and_refused(stack, shard_dir: Path) -> None:
    ok_png = synthetic(50, 40, 7)
    hostile = tar_bytes(
        [
            ("a.png", ok_png),
            ("b.png", ok_png[: len(ok_png) // 2]),  # corrupt: cut in half
            ("c.exe", b"MZ\x90\x00"),  # unsupported extension
            ("d.jpg", b"\xff\xd8\xff" + bytes(BIG)),  # over MAX_SAMPLE_BYTES
            ("../evil.png", ok_png),
            ("/abs.png", ok_png),
            special("sym.png", tarfile.SYMTYPE, "/etc/passwd"),
            special("hard.png", tarfile.LNKTYPE, "a.png"),
            special("dev.png", tarfile.CHRTYPE),
            special("fifo.png", tarfile.FIFOTYPE),
            ("e.png", ok_png),
        ]
    )
    (shard_dir / "hostile-0.tar").write_bytes(hostile)
    noise = png_bytes(Image.fromarray(np.random.default_rng(8).integers(0, 255, (128, 128, 3), dtype=np.uint8)))
    assert len(ok_png) <= 512 and len(noise) > 1000
    cut = tar_bytes([("t0.png", ok_png), ("t1.png", noise), ("t2.png", ok_png)])
    (shard_dir / "hostile-1.tar").write_bytes(cut[: 512 + 1024 + 300])  # t0 whole, t1 cut short
    (shard_dir / "hostile-2.tar").write_bytes(tar_bytes([(f"m{j:03d}.txt", b"x") for j in range(125)]))  # > MAX_SAMPLES_PER_SHARD members
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    head = tarfile.TarInfo("bomb.png")
    head.size = 1 << 33
    bomb = z.compress(head.tobuf()) + b"".join(z.compress(bytes(1 << 20)) for _ in range(48)) + z.flush()
    (shard_dir / "hostile-3.tar.gz").write_bytes(bomb)
    r = submit(stack.url, {"model": "textmask", "input": {"shards": [f"file://{shard_dir}/hostile-{{0..2}}.tar", f"file://{shard_dir}/hostile-3.tar.gz"]}})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    st = wait_job(stack.url, job_id)
    assert st["status"] == "succeeded", st
    p = st["progress"]
    assert (p["shards_done"], p["samples_done"]) == (4, 3)  # a, e, t0
    root = storage_root(stack)
    manifest = json.loads((root / f"default/jobs/{job_id}/manifest.json").read_bytes())
    by = {(s["shard"], s["key"]): s for s in manifest["samples"] if s["key"]}
    assert {k for (sh, k), s in by.items() if sh == 0 and s["status"] == "ok"} == {"a", "e"}
    reasons = {k: s["error"]["message"] for (sh, k), s in by.items() if sh == 0 and s["status"] == "failed"}
    assert set(reasons) == {"b", "c", "d", "../evil", "/abs", "sym", "hard", "dev", "fifo"}
    assert by[(0, "b")]["error"]["code"] in ("undecodable_image", "unsupported_media_type")
    assert "no image member" in reasons["c"] and "over MAX_SAMPLE_BYTES" in reasons["d"]
    assert "unsafe path" in reasons["../evil"] and "unsafe path" in reasons["/abs"]
    assert "is a link" in reasons["sym"] and "is a link" in reasons["hard"] and "device or fifo" in reasons["dev"] and "device or fifo" in reasons["fifo"]
    tar_errors = {s["shard"]: s["error"]["message"] for s in manifest["samples"] if s["key"] is None}
    assert "truncated" in tar_errors[1] and [k for (sh, k), s in by.items() if sh == 1 and s["status"] == "ok"] == ["t0"]
    assert "MAX_SAMPLES_PER_SHARD=120" in tar_errors[2] and sum(1 for (sh, _k) in by if sh == 2) == 120
    assert "gzip bomb" in tar_errors[3]
    assert set(read_tar((root / st["result"]["outputs"][0]["path"]).read_bytes())) == {"a.packbits", "a.json", "e.packbits", "e.json"}
    # nothing outside the job's prefix, no member name ever became a path
    everything = [str(f) for base in (root, shard_dir.parent) for f in base.rglob("*")]
    assert not [f for f in everything if "evil" in f or f.endswith("abs.png")]
    assert all(f.startswith("default/jobs/") for f in (str(x.relative_to(root)) for x in root.rglob("*") if x.is_file()))


def test_bad_submissions_get_exact_statuses(stack, shard_dir: Path) -> None:
    cases = [
        ({"model": "textmask", "input": {"shards": ["file:///etc/passwd"]}}, 403),
        ({"model": "textmask", "input": {"shards": [f"file://{shard_dir}/../x.tar"]}}, 403),
        ({"model": "textmask", "input": {"shards": ["http://example.com/a.tar"]}}, 400),
        ({"model": "textmask", "input": {"shards": ["s3://someone-elses/a-{0..9}.tar"]}}, 403),
        ({"model": "textmask", "input": {"shards": ["s3://b/x-{0..99999999999}.tar"]}}, 413),
        ({"model": "textmask", "input": {"shards": []}}, 422),
        ({"model": "vjepa2", "input": {"shards": [f"file://{shard_dir}/good-000.tar"]}}, 422),
        ({"model": "textmask", "input": {"shards": [f"file://{shard_dir}/good-000.tar"]}, "params": {"format": "jpeg"}}, 422),
    ]
    for body, code in cases:
        r = submit(stack.url, body)
        assert r.status_code == code, (body, r.text)
    # a missing shard is recorded, the job fails (no sample), the service answers on
    r = submit(stack.url, {"model": "textmask", "input": {"shards": [f"file://{shard_dir}/missing.tar"]}})
    st = wait_job(stack.url, r.json()["job_id"])
    assert st["status"] == "failed" and st["error"]["code"] == "no_samples"
    assert st["result"]["shards"][0]["error"]["code"] == "not_found"


def test_sync_tar_keeps_batch_packbits_layout_and_413_over_max_sync_batch(stack) -> None:
    text, gt = with_text("chelsea.png")
    cam = png_bytes(photo("camera.png"))
    body = tar_bytes([("x.png", text), ("y.png", b"\x89PNG\r\n\x1a\n broken"), ("z.png", cam)])
    r = httpx.post(stack.url + "/run_textmask", content=body, headers={"Content-Type": "application/x-tar"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["x-mask-format"] == "packbits" and r.headers["x-batch-size"] == "3" and r.headers["x-sample-keys"] == "x,y,z"
    assert [e["index"] for e in json.loads(r.headers["x-sample-errors"])] == [1]
    # the seed's layout: each mask = 4-byte big-endian length + (uint16 H, W, row_stride + packed rows); a failed one is length 0
    buf, off, parts = r.content, 0, []
    while off < len(buf):
        (n,) = struct.unpack_from(">I", buf, off)
        parts.append(buf[off + 4 : off + 4 + n])
        off += 4 + n
    assert off == len(buf) and [len(p) for p in parts] == [6 + 300 * 57, 0, 6 + 512 * 64]
    assert struct.unpack(">HHH", parts[0][:6]) == (300, 451, 57) and struct.unpack(">HHH", parts[2][:6]) == (512, 512, 64)
    m = codecs.decode_packbits(parts[0])
    assert m.sum() > 300 and m[gt].sum() / m.sum() > 0.8
    five = tar_bytes([(f"k{i}.png", cam) for i in range(5)])
    r = httpx.post(stack.url + "/run_textmask", content=five, headers={"Content-Type": "application/x-tar"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_samples"
    assert "/v1/jobs" in r.json()["error"]["message"] and "MAX_SYNC_BATCH" in r.json()["error"]["message"]
    r = httpx.post(stack.url + "/run_textmask", content=cam, headers={"Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 200 and codecs.decode_packbits(r.content).shape == (512, 512)


def slow_shards(shard_dir: Path, prefix: str, n: int, samples: int) -> None:
    for i in range(n):
        (shard_dir / f"{prefix}-{i}.tar").write_bytes(tar_bytes([(f"k{j:03d}.png", synthetic(160, 120, 1000 * i + j)) for j in range(samples)]))


def test_idempotency_key_and_cancel_stop_remaining_shards(stack, shard_dir: Path) -> None:
    slow_shards(shard_dir, "slow", 4, 120)  # MAX_SAMPLES_PER_SHARD: long enough that a cancel lands mid-job on a fast machine too
    body = {"model": "textmask", "input": {"shards": [f"file://{shard_dir}/slow-{{0..3}}.tar"]}}
    r1 = submit(stack.url, body, headers={"Idempotency-Key": "bulk-1"})
    r2 = submit(stack.url, body, headers={"Idempotency-Key": "bulk-1"})
    assert r1.status_code == 202 and r2.status_code == 200 and r2.json()["job_id"] == r1.json()["job_id"]
    job_id = r1.json()["job_id"]
    t_end = time.time() + 30
    while httpx.get(f"{stack.url}/v1/jobs/{job_id}").json()["progress"].get("samples_done", 0) < 3:
        assert time.time() < t_end, "the job never started"
        time.sleep(0.1)
    assert httpx.delete(f"{stack.url}/v1/jobs/{job_id}").json()["status"] == "cancelled"
    time.sleep(4)  # running shards notice within a progress tick; queued ones are skipped
    st = httpx.get(f"{stack.url}/v1/jobs/{job_id}").json()
    assert st["status"] == "cancelled" and st["progress"]["shards_done"] < 4
    assert stack.redis.llen("textmask:shards") == 0 and stack.redis.hlen(f"tf:shards-running:{job_id}") == 0
    recorded = {k for k in stack.redis.hkeys(f"tf:shards:{job_id}") if k.startswith(b"r:")}
    tars = list((storage_root(stack) / f"default/jobs/{job_id}").rglob("*.tar"))
    assert len(recorded) < 4 and len(tars) == len(recorded)
    # the workers are free again: a small job goes through
    r = submit(stack.url, {"model": "textmask", "input": {"shards": [f"file://{shard_dir}/good-000.tar"]}})
    assert wait_job(stack.url, r.json()["job_id"], 60)["status"] == "succeeded"


# ---------------------------------------------------------------- the S3 stack
@pytest.fixture(scope="module")
def s3_stack(make_stack, moto_s3: str):
    make_bucket(moto_s3, "masks")
    make_bucket(moto_s3, "inbucket")
    env = {"S3_ENDPOINT_URL": moto_s3, "INPUT_URI_ALLOWLIST": "s3://inbucket/data", "MAX_BODY_BYTES": "300000", "TEXTMASK_LIMIT_SIDE_LEN": "320"}
    return make_stack(models=["textmask"], env=env, storage="s3://masks/trifecta")


def test_s3_shards_in_and_out(s3_stack, moto_s3: str, good: dict) -> None:
    s3 = boto3.client("s3", endpoint_url=moto_s3)
    for i in range(2):
        data, _, _ = good_shard(i)
        s3.put_object(Bucket="inbucket", Key=f"data/shard-{i}.tar", Body=data)
    r = submit(s3_stack.url, {"model": "textmask", "input": {"shards": "s3://inbucket/data/shard-{0..1}.tar"}, "params": {"format": "packbits"}})
    assert r.status_code == 202, r.text
    st = wait_job(s3_stack.url, r.json()["job_id"])
    assert st["status"] == "succeeded" and st["progress"]["samples_done"] == 16
    outs = st["result"]["outputs"]
    assert [o["key"] for o in outs] == ["00000-shard-0.tar", "00001-shard-1.tar", "manifest.json"]
    for i, o in enumerate(outs[:2]):
        assert o["url"].startswith(moto_s3)  # presigned
        members = read_tar(s3.get_object(Bucket="masks", Key=f"trifecta/{o['path']}")["Body"].read())
        keys = sorted({n.split(".", 1)[0] for n in members})
        assert keys == sorted(k for k in good["shapes"] if k.startswith(f"s{i}/"))
        for k in keys:
            assert codecs.decode_packbits(members[f"{k}.packbits"]).shape == good["shapes"][k]
    manifest = json.loads(httpx.get(f"{s3_stack.url}/v1/jobs/{st['job_id']}/result", params={"key": "manifest.json"}, timeout=30).content)
    assert manifest["counts"]["done"] == 16 and len(manifest["samples"]) == 16


def test_multipart_shard_upload_is_streamed_to_storage(s3_stack, moto_s3: str) -> None:
    text, gt = with_text("coffee.png")
    big = png_bytes(photo("astronaut.png"))
    shard = tar_bytes([("up/a.png", text), ("up/b.png", big), ("up/c.png", synthetic(90, 70, 3))])
    assert len(shard) > 300_000  # over this stack's MAX_BODY_BYTES: a shard upload is not held to it
    r = httpx.post(
        f"{s3_stack.url}/v1/jobs", files={"file": ("mine.tar", shard, "application/x-tar")}, data={"model": "textmask", "params": '{"format": "png"}'}, timeout=60
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    st = wait_job(s3_stack.url, job_id)
    assert st["status"] == "succeeded" and st["input"]["upload"] == "mine.tar" and st["input"]["bytes"] == len(shard)
    s3 = boto3.client("s3", endpoint_url=moto_s3)
    staged = s3.get_object(Bucket="masks", Key=f"trifecta/default/jobs/{job_id}/_in/shard.tar")["Body"].read()
    assert staged == shard
    members = read_tar(s3.get_object(Bucket="masks", Key=f"trifecta/{st['result']['outputs'][0]['path']}")["Body"].read())
    assert codecs.decode_png(members["up/b.png"]).shape == (512, 512)
    m = codecs.decode_png(members["up/a.png"])
    assert m.shape == gt.shape and m[gt].sum() / max(1, m.sum()) > 0.8
    # an image upload is still held to MAX_BODY_BYTES
    r = httpx.post(f"{s3_stack.url}/v1/jobs", files={"file": ("big.png", big + bytes(300_000), "image/png")}, data={"model": "textmask"}, timeout=60)
    assert r.status_code == 413
    assert httpx.get(f"{s3_stack.url}/health", timeout=5).status_code == 200


# ---------------------------------------------------------------- a worker killed mid-shard (last: it leaves one worker)
def test_worker_killed_mid_shard_is_redone_once(stack, shard_dir: Path) -> None:
    n = 120  # MAX_SAMPLES_PER_SHARD: a shard runs for seconds, so the kill lands mid-shard on a fast machine too
    slow_shards(shard_dir, "kill", 2, n)
    r = submit(stack.url, {"model": "textmask", "input": {"shards": [f"file://{shard_dir}/kill-{{0..1}}.tar"]}})
    job_id = r.json()["job_id"]
    victim = None
    t_end = time.time() + 30
    while victim is None:
        assert time.time() < t_end, "no shard got going"
        for idx, raw in stack.redis.hgetall(f"tf:shards-running:{job_id}").items():
            snap = json.loads(raw)
            if snap["done"] >= 1:  # mid-shard: some samples written, most not (progress is recorded about once a second)
                victim = (int(idx), snap["worker"])
                break
        time.sleep(0.05)
    proc = next(w for w in stack.workers if w.name == victim[1])
    proc.kill()
    st = wait_job(stack.url, job_id, 90)
    assert st["status"] == "succeeded", st
    p = st["progress"]
    assert (p["shards_done"], p["samples_total"], p["samples_done"], p["samples_failed"]) == (2, 2 * n, 2 * n, 0), "no sample counted twice"
    assert int(stack.redis.hget(f"tf:shards:{job_id}", f"a:{victim[0]}")) == 2, "the killed worker's shard was delivered again"
    shard = st["result"]["shards"][victim[0]]
    assert shard["worker"] != victim[1]
    root = storage_root(stack)
    for o in st["result"]["outputs"][:2]:
        names = list(read_tar((root / o["path"]).read_bytes()))
        assert sorted(names) == sorted(f"k{j:03d}.{e}" for j in range(n) for e in ("packbits", "json")), "every sample exactly once"
    manifest = json.loads((root / f"default/jobs/{job_id}/manifest.json").read_bytes())
    assert sorted((s["shard"], s["key"]) for s in manifest["samples"]) == sorted((i, f"k{j:03d}") for i in range(2) for j in range(n))
