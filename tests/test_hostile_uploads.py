"""Hostile input, the remaining cases: big video uploads, many-scan JPEGs, huge SAM3 prompt values.

- A multipart video upload (`POST /v1/jobs`, `kind=video`) streams to storage through
  Starlette's disk spool, counted against MAX_VIDEO_BYTES while it arrives (413 mid-stream,
  with or without Content-Length); the API's memory does not grow with it.
- A JPEG with more than MAX_JPEG_SCANS scans is refused before decoding (422), by the API's
  probe and by the worker's decode alike.
- SAM3 prompt errors quote user values cut to ~100 characters: a 1 MB value gives a small 422.

Real parts: Redis, a vjepa2 worker (tiny checkpoint), a textmask worker, the API process.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import httpx
import pytest
from PIL import Image

from storage import codecs
from tasks.errors import Unprocessable
from tasks.images import MAX_JPEG_SCANS, check_jpeg_scans
from tasks.sam3 import parse_params
from tests.conftest import photo, png_bytes, wait_job
from tests.helpers.clips import write_video
from tests.helpers.stacks import tiny_checkpoint
from tests.helpers.uploads import many_scans, peak_rss_mb, post_until_answered

BODY_LIMIT = 2 << 20  # MAX_BODY_BYTES: what may be held in memory
VIDEO_LIMIT = 40 << 20  # MAX_VIDEO_BYTES: what a video upload may stream to storage
MB = 1 << 20


@pytest.fixture(scope="module")
def inputs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("allowed-inputs")


@pytest.fixture(scope="module")
def stack(make_stack, tmp_path_factory: pytest.TempPathFactory, inputs_root: Path):
    ckpt = tiny_checkpoint("vjepa2", tmp_path_factory.mktemp("ckpt") / "vjepa2")
    env = {"VJEPA2_CHECKPOINT": str(ckpt), "MAX_BODY_BYTES": str(BODY_LIMIT), "MAX_VIDEO_BYTES": str(VIDEO_LIMIT), "ALLOWED_INPUT_ROOTS": str(inputs_root)}
    return make_stack(models=["vjepa2", "textmask"], env=env)


def multipart(fields: list[tuple[str, str]], file: bytes, filename: str = "clip.mp4", file_at: int | None = None) -> tuple[bytes, str]:
    """A multipart body by hand, the file part at position `file_at` among the fields (default last)."""
    boundary = "----trifecta-video"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields]
    fpart = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\nContent-Type: video/mp4\r\n\r\n'.encode() + file + b"\r\n"
    parts.insert(len(parts) if file_at is None else file_at, fpart)
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def still_serves(stack) -> None:
    r = httpx.post(stack.url + "/run_textmask?format=png", content=png_bytes(photo("chelsea.png").resize((64, 48))), headers={"Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 200 and codecs.decode_png(r.content).shape == (48, 64), r.text[:200]
    assert all(w.alive() for w in stack.workers)


# ---------------------------------------------------------------- video uploads
@pytest.mark.parametrize("kind_first", [True, False], ids=["kind-before-file", "kind-after-file"])
def test_valid_video_upload_streams_to_storage_and_runs(stack, tmp_path: Path, kind_first: bool) -> None:
    path = tmp_path / "ok.mp4"
    write_video(path)
    video = path.read_bytes()
    fields = [("model", "vjepa2"), ("kind", "video"), ("params", json.dumps({"stride": 16}))]
    body, ctype = multipart(fields, video, "ok.mp4", file_at=None if kind_first else 1)
    r = httpx.post(stack.url + "/v1/jobs", content=body, headers={"Content-Type": ctype}, timeout=30)
    assert r.status_code == 202, r.text
    j = wait_job(stack.url, r.json()["job_id"], 90)
    assert j["status"] == "succeeded", j
    assert j["input"] == {"kind": "video", "bytes": len(video), "filename": "ok.mp4"}
    assert [(c["start_frame"], c["end_frame"]) for c in j["result"]["meta"]["clip_results"]] == [(0, 15), (16, 31), (32, 47), (48, 63), (54, 69)]


def test_big_video_upload_is_not_held_in_api_memory(stack) -> None:
    """32 MB, 16x MAX_BODY_BYTES: accepted (the video limit applies), copied to storage byte for
    byte, and the API's peak RSS grows by far less than the upload."""
    data = os.urandom(32 * MB)
    body, ctype = multipart([("model", "vjepa2"), ("kind", "video")], data, "big.mp4")
    before = peak_rss_mb(stack.api.p.pid)
    r = httpx.post(stack.url + "/v1/jobs", content=body, headers={"Content-Type": ctype}, timeout=60)
    grew = peak_rss_mb(stack.api.p.pid) - before
    assert r.status_code == 202, r.text
    jid = r.json()["job_id"]
    staged = stack.tmp / "data" / "default" / "jobs" / jid / "_in" / "video"
    assert staged.stat().st_size == len(data) and hashlib.sha256(staged.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert grew < 12, f"API peak RSS grew {grew:.1f} MB for a 32 MB upload"
    j = wait_job(stack.url, jid, 60)  # random bytes are no video: the worker says so
    assert j["status"] == "failed" and j["error"]["code"] == "unreadable_video", j


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
def test_video_upload_over_the_limit_is_413_while_streaming(stack, chunked: bool) -> None:
    """64 MB against MAX_VIDEO_BYTES=40 MB: the 413 comes while the client is still sending."""
    marker = b"<the file>"
    body, ctype = multipart([("model", "vjepa2"), ("kind", "video")], marker, "huge.mp4")
    head, tail = body.split(marker)
    pieces = [head] + [b"\0" * MB] * 64 + [tail]
    before = peak_rss_mb(stack.api.p.pid)
    status, answer, sent, total = post_until_answered(stack.url, "/v1/jobs", ctype, pieces, chunked)
    assert status == 413, answer
    err = answer["error"]
    assert err["code"] == "payload_too_large" and f"passed {VIDEO_LIMIT} bytes (MAX_VIDEO_BYTES)" in err["message"], err
    assert VIDEO_LIMIT < sent < total - 8 * MB, (sent, total)  # refused once past the limit, well before the end (socket buffers hold a few MB)
    assert peak_rss_mb(stack.api.p.pid) - before < 12
    assert not list((stack.tmp / "data").glob("default/jobs/*/_in/video*")) or all(
        p.stat().st_size < VIDEO_LIMIT for p in (stack.tmp / "data").glob("default/jobs/*/_in/video*")
    )  # nothing of it reached storage
    still_serves(stack)


def test_image_upload_is_still_capped_by_max_body_bytes(stack) -> None:
    """Only an upload that says `kind=video` up front gets the video limit."""
    body, ctype = multipart([("model", "textmask")], b"\0" * (BODY_LIMIT + MB), "x.png")
    r = httpx.post(stack.url + "/v1/jobs", content=body, headers={"Content-Type": ctype}, timeout=30)
    assert r.status_code == 413 and "MAX_BODY_BYTES" in r.json()["error"]["message"], r.text[:300]


# ---------------------------------------------------------------- many-scan JPEGs
def _jpeg(progressive: bool, mode: str = "RGB", size: tuple[int, int] = (64, 48)) -> bytes:
    bio = io.BytesIO()
    photo("chelsea.png").resize(size).convert(mode).save(bio, "JPEG", progressive=progressive, quality=90)
    return bio.getvalue()


def test_scan_count_of_ordinary_jpegs() -> None:
    assert check_jpeg_scans(_jpeg(False)) == 1
    assert check_jpeg_scans(_jpeg(True)) == 10
    assert check_jpeg_scans(_jpeg(True, "L")) == 6
    # segment payloads are skipped by length: a COM holding FFDA bytes or an APP1 holding a whole JPEG adds no scan
    prog = _jpeg(True)
    com = b"\xff\xfe" + (2 + 8).to_bytes(2, "big") + b"\xff\xda\xff\xda\xff\xda\x00\x00"
    inner = _jpeg(True, size=(16, 16))
    app1 = b"\xff\xe1" + (2 + len(inner)).to_bytes(2, "big") + inner
    assert check_jpeg_scans(prog[:2] + com + app1 + prog[2:]) == 10
    assert check_jpeg_scans(many_scans(prog, 40)) == 50
    with pytest.raises(Unprocessable, match="more than 100 scans"):
        check_jpeg_scans(many_scans(prog, MAX_JPEG_SCANS))
    assert check_jpeg_scans(prog[: len(prog) // 2]) <= 10  # truncated: counts what is there, leaves the rest to the decoder


def test_jpeg_with_too_many_scans_is_422_at_the_api_and_on_the_worker(stack, inputs_root: Path) -> None:
    bomb = many_scans(_jpeg(True), 500)
    im = Image.open(io.BytesIO(bomb))
    im.load()  # the decoder itself takes it: the scan count is what refuses it
    assert im.size == (64, 48)
    r = httpx.post(stack.url + "/run_textmask?format=png", content=bomb, headers={"Content-Type": "image/jpeg"}, timeout=30)
    assert r.status_code == 422, r.text[:300]
    err = r.json()["error"]
    assert err["code"] == "undecodable_image" and f"more than {MAX_JPEG_SCANS} scans" in err["message"], err
    # a job by URI is not probed by the API: the worker's decode refuses it the same way
    (inputs_root / "scans.jpg").write_bytes(bomb)
    r = httpx.post(stack.url + "/v1/jobs", json={"model": "textmask", "input": {"uri": f"file://{inputs_root}/scans.jpg"}, "params": {"format": "png"}}, timeout=30)
    assert r.status_code == 202, r.text
    j = wait_job(stack.url, r.json()["job_id"], 60)
    assert j["status"] == "failed" and j["error"]["code"] == "undecodable_image" and "scans" in j["error"]["message"], j
    # an ordinary progressive JPEG goes through
    r = httpx.post(stack.url + "/run_textmask?format=png", content=_jpeg(True), headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert r.status_code == 200 and codecs.decode_png(r.content).shape == (48, 64)
    still_serves(stack)


# ---------------------------------------------------------------- SAM3 prompt values
HUGE = "A" * MB

SAM3_CASES = [
    ({"prompts": [{"type": HUGE}]}, "prompts[0] has unknown type 'AAA"),
    ({"prompts": [{"type": "box", "box": HUGE}]}, "prompts[0].box must be [cx, cy, w, h]"),
    ({"prompts": [{"type": "box", "box": [HUGE, 0.5, 0.1, 0.1]}]}, "prompts[0].box must be a finite number, got 'AAA"),
    ({"prompts": [{"type": "box", "box": [0.5, 0.5, 0.1, 0.1], "label": HUGE}]}, "prompts[0].label must be true"),
    ({"prompts": [{"type": "box", "box": [0.5, 0.5, 0.1, 0.1], "label": [HUGE] * 100}]}, "prompts[0].label must be true"),
    ({"prompts": [{"type": "box", "box": [10**400, 0.5, 0.1, 0.1]}]}, "prompts[0].box must be a finite number, got 1000"),
    ({"prompts": [{"type": "text", "text": HUGE}]}, "prompts[0].text is 1048576 characters; at most 200"),
]


@pytest.mark.parametrize(("params", "msg"), SAM3_CASES, ids=["type", "box", "box-item", "label", "label-list", "big-int", "text"])
def test_sam3_prompt_errors_quote_at_most_100_characters(params: dict, msg: str) -> None:
    with pytest.raises(Unprocessable) as ei:
        parse_params(params, max_prompts=8)
    m = ei.value.message
    assert m.startswith(msg), m[:300]
    assert len(m) < 400, len(m)


def test_sam3_segment_with_a_1mb_prompt_value_answers_a_small_422(stack) -> None:
    for params, msg in SAM3_CASES[:4] + SAM3_CASES[6:]:  # (not the 100 MB list; orjson takes no 10**400)
        body = json.dumps({"image": "aGVsbG8=", **params})
        assert len(body) > MB
        r = httpx.post(stack.url + "/api/v1/image/segment", content=body, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 422, r.text[:300]
        assert len(r.content) < 600, len(r.content)
        assert r.json()["error"]["message"].startswith(msg)
    still_serves(stack)
