"""Hostile input, round two: the holes an attack on the landed service found (issue 15).

Each test replays one attack against a real stack (API with API keys, a textmask worker
running PP-OCRv4, an echo worker that also holds decode-only video sessions), asserts the
exact answer, checks that nothing else changed, and that the service still answers a
normal request with its workers alive. Every attack here succeeded before its fix.

Limits of this stack are small so attacks stay cheap: MAX_BODY_BYTES 2 MB,
MAX_INFLIGHT_BODY_BYTES 3 MB, HEADER_TIMEOUT_S 2, MAX_CONNECTIONS_PER_CLIENT 12,
MAX_JPEG_SCAN_PIXELS 20 M, MAX_SESSIONS_PER_TENANT 2.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import random
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from storage import codecs
from tasks import images, keys
from tasks.errors import translate
from tasks.images import check_jpeg_scans
from tasks.settings import Settings
from tests.conftest import ROOT, photo, png_bytes
from tests.helpers.jpegscan import check_jpeg_scans_regex
from tests.helpers.uploads import many_scans, peak_rss_mb, post_until_answered
from tests.helpers.videos import write_video

MB = 1 << 20
BODY_LIMIT = 2 * MB
INFLIGHT = 3 * MB
CONN_CAP = 12
SCAN_PIXELS = 20_000_000
KEY_A = "ka-round2-5d1f0c3e9b7a4f2e8c6d"
KEY_B = "kb-round2-0a9b8c7d6e5f4a3b2c1d"
KEY_F = "kf-round2-from-the-keys-file-77"
A = {"X-API-Key": KEY_A}
B = {"X-API-Key": KEY_B}


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("keys") / "keys.txt"
    p.write_text(f"{KEY_F}:tenantF\n")
    return p


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("round2-inputs")
    write_video(d / "shapes.mp4")
    return d


@pytest.fixture(scope="module")
def stack(make_stack, keys_file: Path, roots: Path):
    env = {
        "API_KEYS": f"{KEY_A}:tenantA,{KEY_B}:tenantB",
        "API_KEYS_FILE": str(keys_file),
        "MAX_BODY_BYTES": str(BODY_LIMIT),
        "MAX_INFLIGHT_BODY_BYTES": str(INFLIGHT),
        "HEADER_TIMEOUT_S": "2",
        "MAX_CONNECTIONS_PER_CLIENT": str(CONN_CAP),
        "MAX_JPEG_SCAN_PIXELS": str(SCAN_PIXELS),
        "VIDEO_SESSION_MODEL": "echo",
        "MAX_SESSIONS_PER_WORKER": "8",
        "MAX_SESSIONS_PER_TENANT": "2",
        "ALLOWED_INPUT_ROOTS": str(roots),
    }
    st = make_stack(models=["textmask"], env=env, api=False)
    st.start_worker("echo", "echo-r2")
    st.start_api()
    st.wait_live("textmask")
    st.wait_live("echo")
    return st


def small_png() -> bytes:
    return png_bytes(photo("coffee.png").resize((64, 48)))


def still_serves(stack) -> None:
    """A normal request right after: a 64x48 photo through the real textmask worker, mask shape checked."""
    r = httpx.post(stack.url + "/run_textmask?format=png", content=small_png(), headers={"Content-Type": "image/png", **A}, timeout=60)
    assert r.status_code == 200, r.text[:300]
    assert codecs.decode_png(r.content).shape == (48, 64)
    assert all(w.alive() for w in stack.workers), [w.tail() for w in stack.workers if not w.alive()]
    assert stack.api.alive(), stack.api.tail()


def job_ids(stack, key: dict[str, str]) -> list[str]:
    return [j["job_id"] for j in httpx.get(stack.url + "/v1/jobs?limit=200", headers=key, timeout=10).json()["jobs"]]


def multipart(fields: list[tuple[str, str]], file: bytes, filename: str, ctype: str = "image/png") -> tuple[bytes, str]:
    boundary = "----trifecta-round2"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\nContent-Type: {ctype}\r\n\r\n'.encode() + file + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def raw_conn(stack) -> socket.socket:
    u = urlsplit(stack.url)
    s = socket.create_connection((u.hostname, u.port), timeout=30)
    return s


def read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = s.recv(65536)
        if not chunk:
            raise AssertionError(f"closed before an answer: {raw!r}")
        raw += chunk
    head, rest = raw.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    n = int(headers.get("content-length", "0"))
    while len(rest) < n:
        rest += s.recv(65536)
    return int(lines[0].split()[1]), headers, rest[:n]


# ---------------------------------------------------------------- 1. sparse tars
def _gnu_sparse_member(name: str, declared: int, data: bytes) -> bytes:
    """A GNU sparse ('S') member: one run of `data` at offset 0, then holes up to `declared` bytes."""
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    buf = bytearray(ti.tobuf(tarfile.GNU_FORMAT))
    buf[156:157] = tarfile.GNUTYPE_SPARSE
    buf[386:398] = b"%011o\0" % 0  # sparse[0].offset
    buf[398:410] = b"%011o\0" % len(data)  # sparse[0].numbytes
    buf[482] = 0  # not extended
    buf[483:495] = b"%011o\0" % declared  # realsize
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % sum(buf[:512])
    return bytes(buf) + data + b"\0" * (-len(data) % 512)


def gnu_sparse_tar(n: int, declared: int) -> bytes:
    return b"".join(_gnu_sparse_member(f"s{i:03d}.png", declared, b"\x89PNG") for i in range(n)) + b"\0" * 1024


def pax_sparse_tar(n: int, declared: int) -> bytes:
    """The pax form (GNU.sparse.map / GNU.sparse.size, format 0.1) of the same thing."""
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(n):
            ti = tarfile.TarInfo(f"p{i:03d}.png")
            ti.size = 4
            ti.pax_headers = {"GNU.sparse.map": "0,4", "GNU.sparse.size": str(declared)}
            tf.addfile(ti, io.BytesIO(b"\x89PNG"))
    return bio.getvalue()


def test_sparse_tars_are_refused_unit() -> None:
    from tasks.tars import iter_members, read_small_tar

    ok = tarfile.TarInfo("ok.png")
    ok.size = len(small_png())
    good = ok.tobuf(tarfile.GNU_FORMAT) + small_png() + b"\0" * (-ok.size % 512)  # one member, no end blocks
    for mk in (gnu_sparse_tar, pax_sparse_tar):
        t = mk(8, 8 * MB)
        assert len(t) < 32 << 10
        with pytest.raises(Exception, match="sparse") as ei:
            read_small_tar(io.BytesIO(t), max_member=64 * MB, max_members=100)
        assert translate(ei.value).status == 422
        members = list(iter_members(io.BytesIO(t), max_member=64 * MB, max_members=100))
        assert members == [{"fname": None, "data": None, "refused": members[0]["refused"]}] and "sparse" in members[0]["refused"]
        # a good sample before the sparse one is kept; nothing of the sparse one is read
        samples = read_small_tar(io.BytesIO(good + t), max_member=64 * MB, max_members=100)
        assert [s.key for s in samples] == ["ok", "__tar__"] and samples[0].files["png"] == small_png() and "sparse" in samples[1].errors[0]
    # declared sizes add up past the total: refused before the member that passes it is read
    three = io.BytesIO()
    with tarfile.open(fileobj=three, mode="w") as tf:
        for i in range(3):
            ti = tarfile.TarInfo(f"m{i}.png")
            ti.size = 1000
            tf.addfile(ti, io.BytesIO(b"\0" * 1000))
    with pytest.raises(Exception, match="more than 2500 bytes") as ei:
        read_small_tar(io.BytesIO(three.getvalue()), max_member=64 * MB, max_members=100, max_total=2500)
    assert translate(ei.value).status == 413
    ms = list(iter_members(io.BytesIO(three.getvalue()), max_member=64 * MB, max_members=100, max_total=2500))
    assert [m["fname"] for m in ms] == ["m0.png", "m1.png", None] and "more than 2500 bytes" in ms[2]["refused"]
    # a pax header declaring gigabytes of metadata is refused before tarfile reads it
    pax = bytearray(tarfile.TarInfo("x").tobuf(tarfile.USTAR_FORMAT))
    pax[156:157] = tarfile.XHDTYPE
    pax[124:136] = b"%011o\0" % (4 << 30)
    pax[148:156] = b" " * 8
    pax[148:156] = b"%06o\0 " % sum(pax[:512])
    ms = list(iter_members(io.BytesIO(bytes(pax) + b"\0" * 4096), max_member=64 * MB, max_members=100))
    assert ms[0]["fname"] is None and "metadata" in ms[0]["refused"]


def test_sparse_tar_on_the_sync_endpoint_is_422_without_expanding(stack) -> None:
    """20 members of 8 MiB of holes each in a 20 KiB body: expanded, that is 160 MiB in the API."""
    before = job_ids(stack, A)
    for mk in (gnu_sparse_tar, pax_sparse_tar):
        body = mk(20, 8 * MB)
        assert len(body) < 64 << 10
        rss0 = peak_rss_mb(stack.api.p.pid)
        r = httpx.post(stack.url + "/run_echo", content=body, headers={"Content-Type": "application/x-tar", **A}, timeout=60)
        assert r.status_code == 422, (r.status_code, r.text[:300])
        err = r.json()["error"]
        assert err["code"] == "unprocessable" and "sparse" in err["message"], err
        assert peak_rss_mb(stack.api.p.pid) - rss0 < 40
    assert job_ids(stack, A) == before  # nothing was queued
    still_serves(stack)


def one_png_tar() -> bytes:
    ti = tarfile.TarInfo("good.png")
    ti.size = len(small_png())
    return ti.tobuf(tarfile.GNU_FORMAT) + small_png() + b"\0" * (-ti.size % 512) + b"\0" * 1024


def test_sparse_shard_upload_is_refused_by_the_worker(stack) -> None:
    def shard_job(tar: bytes) -> dict:
        body, ctype = multipart([("model", "echo"), ("kind", "shard")], tar, "s.tar", "application/x-tar")
        r = httpx.post(stack.url + "/v1/jobs", content=body, headers={"Content-Type": ctype, **A}, timeout=30)
        assert r.status_code == 202, r.text
        return wait_job_key(stack, r.json()["job_id"], A)

    good = shard_job(one_png_tar())  # also loads the worker's shard pipeline (webdataset), so RSS below is the shard's own
    assert good["status"] == "succeeded" and good["progress"]["samples_done"] == 1, good
    echo = next(w for w in stack.workers if w.name == "echo-r2")
    rss0 = peak_rss_mb(echo.p.pid)
    j = shard_job(gnu_sparse_tar(20, 8 * MB))
    assert j["status"] == "failed" and j["error"]["code"] == "no_samples" and j["progress"]["samples_done"] == 0, j
    manifests = " ".join(p.read_text() for p in (stack.tmp / "data" / "tenantA" / "jobs" / j["job_id"]).rglob("*.json"))
    assert "is a sparse file" in manifests, manifests[:1000]
    assert peak_rss_mb(echo.p.pid) - rss0 < 40  # 160 MiB of holes were never expanded
    still_serves(stack)


# ---------------------------------------------------------------- 2. JPEG scans behind a junk byte, and the decode budget
def _jpeg(progressive: bool, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    bio = io.BytesIO()
    photo("chelsea.png").resize(size).convert(mode).save(bio, "JPEG", progressive=progressive, quality=90)
    return bio.getvalue()


def with_junk_after_first_segment(j: bytes) -> bytes:
    seg = 4 + int.from_bytes(j[4:6], "big")  # SOI (2) + APP0 marker (2) + its length
    assert j[2] == 0xFF and 0xE0 <= j[3] <= 0xEF  # APP0 (JFIF) or APP14 (Adobe, CMYK)
    return j[:seg] + b"\x00" + j[seg:]


def test_scan_count_skips_junk_bytes_as_libjpeg_does() -> None:
    bomb = many_scans(_jpeg(True), 500)
    junk = with_junk_after_first_segment(bomb)
    im = Image.open(io.BytesIO(junk))
    im.load()  # Pillow / libjpeg skip the junk byte and decode every scan
    assert im.size == (64, 48)
    with pytest.raises(Exception, match="more than 100 scans"):
        check_jpeg_scans(junk)
    # junk between every segment, and fill bytes before markers, change nothing for an ordinary file
    prog = _jpeg(True)
    assert check_jpeg_scans(with_junk_after_first_segment(prog)) == 10
    assert check_jpeg_scans(prog.replace(b"\xff\xda", b"\xff\xff\xff\xda")) == 10
    assert check_jpeg_scans(_jpeg(False)) == 1


def test_vectorised_scan_count_walks_exactly_as_the_regex_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    """check_jpeg_scans finds marker codes in one numpy pass and jumps between them; it must land
    where the plain regex search lands, on real files and on hostile byte soup (FF runs, stuffed
    FF00, RSTn, lengths that point anywhere, truncation), counts and refusals alike."""
    rng = random.Random(19)
    prog, base = _jpeg(True), _jpeg(False)
    cases = [prog, base, with_junk_after_first_segment(prog), many_scans(prog, 120), prog[: len(prog) // 3], b"", b"\xff", b"\xff\xd8", b"\xff\xd8\xff"]
    alphabet = [0xFF, 0x00, 0xDA, 0xD9, 0xD0, 0xD7, 0x01, 0xC4, 0x02, 0x10, 0x7F]
    for _ in range(3000):
        n = rng.randrange(0, 80)
        soup = bytes(rng.choice(alphabet) if rng.random() < 0.7 else rng.randrange(256) for _ in range(n))
        cases.append(b"\xff\xd8" + soup)
    for _ in range(300):  # a real file with a few bytes overwritten
        b = bytearray(prog)
        for _ in range(rng.randrange(1, 6)):
            b[rng.randrange(2, len(b))] = rng.choice(alphabet)
        cases.append(bytes(b))
    for data, chunk, limit in [(d, c, lim) for d in cases for c in (images._SCAN_CHUNK, 5) for lim in (100, 2)]:
        monkeypatch.setattr(images, "_SCAN_CHUNK", chunk)  # 5 bytes: every chunk boundary crossed
        try:
            want: object = check_jpeg_scans_regex(data, limit)
        except Exception as e:  # noqa: BLE001 - the refusal must match too
            want = type(e)
        try:
            got: object = check_jpeg_scans(data, limit)
        except Exception as e:  # noqa: BLE001
            got = type(e)
        assert got == want, (data[:64], chunk, limit)


def test_junk_byte_scan_bomb_is_422_at_the_api_and_on_the_worker(stack, roots: Path) -> None:
    junk = with_junk_after_first_segment(many_scans(_jpeg(True, mode="CMYK"), 500))
    before = job_ids(stack, A)
    r = httpx.post(stack.url + "/run_textmask?format=png", content=junk, headers={"Content-Type": "image/jpeg", **A}, timeout=60)
    assert r.status_code == 422, r.text[:300]
    assert r.json()["error"]["code"] == "undecodable_image" and "more than 100 scans" in r.json()["error"]["message"]
    assert job_ids(stack, A) == before
    (roots / "junk.jpg").write_bytes(junk)  # a URI job is not probed by the API: the worker refuses it the same way
    r = httpx.post(stack.url + "/v1/jobs", json={"model": "textmask", "input": {"uri": f"file://{roots}/junk.jpg"}}, headers=A, timeout=30)
    assert r.status_code == 202, r.text
    j = wait_job_key(stack, r.json()["job_id"], A)
    assert j["status"] == "failed" and j["error"]["code"] == "undecodable_image" and "scans" in j["error"]["message"], j
    still_serves(stack)


def test_decode_cost_over_the_budget_is_413_and_a_cheap_one_passes(stack, roots: Path) -> None:
    """1000x800 progressive, 30 scans: 24 M pixel-scans > MAX_JPEG_SCAN_PIXELS=20 M; the same image baseline costs 0.8 M."""
    costly = many_scans(_jpeg(True, (1000, 800)), 20)
    assert check_jpeg_scans(costly) == 30
    r = httpx.post(stack.url + "/run_textmask?format=png", content=costly, headers={"Content-Type": "image/jpeg", **A}, timeout=60)
    assert r.status_code == 413, r.text[:300]
    err = r.json()["error"]
    assert err["code"] == "image_too_large" and "MAX_JPEG_SCAN_PIXELS" in err["message"] and "24000000" in err["message"], err
    (roots / "costly.jpg").write_bytes(costly)
    r = httpx.post(stack.url + "/v1/jobs", json={"model": "textmask", "input": {"uri": f"file://{roots}/costly.jpg"}}, headers=A, timeout=30)
    j = wait_job_key(stack, r.json()["job_id"], A)
    assert j["status"] == "failed" and j["error"]["code"] == "image_too_large", j
    r = httpx.post(stack.url + "/run_textmask?format=png", content=_jpeg(False, (1000, 800)), headers={"Content-Type": "image/jpeg", **A}, timeout=60)
    assert r.status_code == 200 and codecs.decode_png(r.content).shape == (800, 1000), r.text[:300]
    still_serves(stack)


def wait_job_key(stack, job_id: str, key: dict[str, str], timeout: float = 60) -> dict:
    t_end = time.time() + timeout
    while time.time() < t_end:
        j = httpx.get(f"{stack.url}/v1/jobs/{job_id}", headers=key, timeout=10).json()
        if j.get("status") in keys.TERMINAL:
            return j
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not finished")


# ---------------------------------------------------------------- 3. a deleted key file revokes its keys
def test_deleting_the_keys_file_revokes_its_keys(stack, keys_file: Path) -> None:
    def status(key: str) -> int:
        return httpx.get(stack.url + "/v1/jobs", headers={"X-API-Key": key}, timeout=10).status_code

    assert status(KEY_F) == 200
    keys_file.unlink()
    t_end = time.time() + 15
    while status(KEY_F) != 401:
        assert time.time() < t_end, "a key of the deleted file is still accepted"
        time.sleep(0.2)
    assert status(KEY_A) == 200 and status(KEY_B) == 200  # API_KEYS stay
    assert "API_KEYS_FILE" in stack.api.tail(200) and "ERROR" in stack.api.tail(200)
    keys_file.write_text(f"{KEY_F}:tenantF\n")  # put back: read again
    t_end = time.time() + 15
    while status(KEY_F) != 200:
        assert time.time() < t_end, "the restored file's key is not accepted"
        time.sleep(0.2)
    still_serves(stack)


# ---------------------------------------------------------------- 4. slow headers and connections per client
def test_slow_headers_get_408_and_are_closed(stack) -> None:
    """Five sockets sending one header byte every 0.5 s: each is answered 408 and closed
    (HEADER_TIMEOUT_S=2); before, they were held as long as they kept sending."""
    socks = [raw_conn(stack) for _ in range(5)]
    for s in socks:
        s.settimeout(0.05)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    answers: dict[int, bytes] = {}
    t_end = time.time() + 30
    while len(answers) < len(socks) and time.time() < t_end:
        for i, s in enumerate(socks):
            if i in answers:
                continue
            try:
                got = s.recv(4096)
                answers[i] = got  # the answer (or b"" if closed without one)
                continue
            except TimeoutError:
                pass
            try:
                s.sendall(b"x")
            except OSError:
                answers[i] = b""
        time.sleep(0.5)
    assert len(answers) == len(socks), "slow-header connections are still held"
    for i, s in enumerate(socks):
        assert answers[i].startswith(b"HTTP/1.1 408"), answers[i][:200]
        s.settimeout(5)
        rest = b""
        try:
            while chunk := s.recv(4096):
                rest += chunk
        except OSError:
            pass
        assert b'"code": "timeout"' in answers[i] + rest
        s.close()
    still_serves(stack)


def test_connections_per_client_are_capped(stack) -> None:
    held = []
    try:
        for _ in range(CONN_CAP):  # kept-alive connections: each answered once, then idle (no header timeout between requests)
            s = raw_conn(stack)
            s.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(s)[0] == 200
            held.append(s)
        extra = raw_conn(stack)
        status, headers, body = read_response(extra)
        assert status == 503 and headers["retry-after"] == "1" and json.loads(body)["error"]["code"] == "overloaded"
        assert extra.recv(10) == b""  # and closed
        extra.close()
    finally:
        for s in held:
            s.close()
    t_end = time.time() + 10  # the slots are free again once the server saw the closes
    while True:
        try:
            still_serves(stack)
            break
        except (httpx.HTTPError, AssertionError):
            assert time.time() < t_end
            time.sleep(0.2)


# ---------------------------------------------------------------- 5. a field's value does not lift the upload limit
def test_field_value_naming_a_tar_does_not_lift_the_limit(stack) -> None:
    marker = b"<the file>"
    body, ctype = multipart([("model", "textmask"), ("note", 'see filename="z.tar" here')], marker, "x.png")
    head, tail = body.split(marker)
    pieces = [head] + [b"\0" * MB] * 16 + [tail]
    with_key = f"{ctype}\r\nX-API-Key: {KEY_A}"  # post_until_answered writes the Content-Type header line as given
    status, answer, sent, total = post_until_answered(stack.url, "/v1/jobs", with_key, pieces, chunked=True)
    assert status == 413, answer
    assert answer["error"]["code"] == "payload_too_large" and f"passed {BODY_LIMIT} bytes (MAX_BODY_BYTES)" in answer["error"]["message"], answer
    assert sent < total - 6 * MB, (sent, total)  # refused once past the body limit, not after reading it all
    # a real shard part (its own header says .tar) still gets the shard limit: 3 MB > MAX_BODY_BYTES is accepted
    shard = io.BytesIO()
    with tarfile.open(fileobj=shard, mode="w") as tf:
        big = np.random.default_rng(0).integers(0, 255, (1100, 900, 3), np.uint8)
        data = png_bytes(Image.fromarray(big))
        ti = tarfile.TarInfo("big.png")
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    assert len(shard.getvalue()) > BODY_LIMIT
    body, ctype = multipart([("model", "echo")], shard.getvalue(), "s.tar", "application/x-tar")
    r = httpx.post(stack.url + "/v1/jobs", content=body, headers={"Content-Type": ctype, **A}, timeout=60)
    assert r.status_code == 202, r.text
    j = wait_job_key(stack, r.json()["job_id"], A)
    assert j["status"] == "succeeded" and j["progress"]["samples_done"] == 1, j
    still_serves(stack)


# ---------------------------------------------------------------- 6. no exception text in a 500
def test_multipart_shards_kind_with_an_image_is_422(stack) -> None:
    before = job_ids(stack, A)
    body, ctype = multipart([("model", "textmask"), ("kind", "shards")], small_png(), "x.png")
    r = httpx.post(stack.url + "/v1/jobs", content=body, headers={"Content-Type": ctype, **A}, timeout=30)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "unprocessable" and "'shards' is not one of image, shard, video" in err["message"], err
    assert "AttributeError" not in r.text and job_ids(stack, A) == before
    still_serves(stack)


def test_an_unexpected_error_answers_a_log_reference_not_its_text(caplog: pytest.LogCaptureFixture) -> None:
    from api.fastpath import error_response

    exc = AttributeError("'bytes' object has no attribute 'file' at /srv/secret/path")
    with caplog.at_level("ERROR", logger="trifecta.errors"):
        resp = error_response(exc)
    body = json.loads(resp.body)
    assert resp.status_code == 500 and body["error"]["code"] == "internal"
    msg = body["error"]["message"]
    assert "bytes" not in msg and "AttributeError" not in msg and "/srv" not in msg
    ref = msg.split("(ref ")[1].split(")")[0]
    assert any(ref in r.getMessage() and "AttributeError" in r.getMessage() for r in caplog.records)  # the log has it, with the reference


# ---------------------------------------------------------------- 7. video session ids per tenant, and a quota
def _start_session(stack, key: dict[str, str], roots: Path, sid: str | None = None) -> httpx.Response:
    body = {"video_path": str(roots / "shapes.mp4"), **({"session_id": sid} if sid else {})}
    return httpx.post(stack.url + "/api/v1/video/session/start", json=body, headers=key, timeout=60)


def test_video_session_ids_are_per_tenant_with_a_quota(stack, roots: Path) -> None:
    u = stack.url + "/api/v1/video"
    a1 = _start_session(stack, A, roots, "shared-id")
    assert a1.status_code == 200, a1.text
    b1 = _start_session(stack, B, roots, "shared-id")  # before: 409, telling B that A uses the id
    assert b1.status_code == 200, b1.text
    assert b1.json()["session_id"] == "shared-id"
    assert _start_session(stack, A, roots, "shared-id").status_code == 409  # the same tenant's id is still taken
    a2 = _start_session(stack, A, roots)
    assert a2.status_code == 200, a2.text
    a3 = _start_session(stack, A, roots)  # MAX_SESSIONS_PER_TENANT=2
    assert a3.status_code == 429, a3.text
    assert a3.json()["error"]["code"] == "quota_exceeded" and "MAX_SESSIONS_PER_TENANT=2" in a3.json()["error"]["message"] and int(a3.headers["Retry-After"]) > 0
    b2 = _start_session(stack, B, roots)  # B's own quota is untouched by A's
    assert b2.status_code == 200, b2.text
    listed = {t: sorted(s["session_id"] for s in httpx.get(u + "/sessions", headers=k, timeout=10).json()["sessions"]) for t, k in (("A", A), ("B", B))}
    assert listed == {"A": sorted(["shared-id", a2.json()["session_id"]]), "B": sorted(["shared-id", b2.json()["session_id"]])}
    assert httpx.delete(u + "/session/shared-id", headers=A, timeout=30).status_code == 200
    st = httpx.get(u + "/session/shared-id/status", headers=B, timeout=30)  # B's session of that id is untouched
    assert st.status_code == 200 and st.json()["video_info"]["total_frames"] == 12, st.text
    assert httpx.get(u + "/session/shared-id/status", headers=A, timeout=30).status_code == 404
    a4 = _start_session(stack, A, roots)  # a closed session frees its place in the quota
    assert a4.status_code == 200, a4.text
    for key, sid in ((A, a2.json()["session_id"]), (A, a4.json()["session_id"]), (B, "shared-id"), (B, b2.json()["session_id"])):
        assert httpx.delete(f"{u}/session/{sid}", headers=key, timeout=30).status_code == 200
    assert all(httpx.get(u + "/sessions", headers=k, timeout=10).json()["count"] == 0 for k in (A, B))
    still_serves(stack)


# ---------------------------------------------------------------- 8. input that would be changed silently
@pytest.mark.parametrize("params", ['{"format": "png", "t": NaN}', '{"x": [1, {"y": 1e309}]}', '{"z": -Infinity}'], ids=["nan", "1e309", "-inf"])
def test_non_finite_params_are_422(stack, params: str) -> None:
    before = job_ids(stack, A)
    image = base64.b64encode(small_png()).decode()
    raw = f'{{"model": "echo", "input": {{"image": "{image}"}}, "params": {params}}}'  # raw JSON text, as a client other than Python would send it
    r = httpx.post(stack.url + "/v1/jobs", content=raw, headers={"Content-Type": "application/json", **A}, timeout=30)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "unprocessable" and "not a finite number" in r.json()["error"]["message"]
    assert job_ids(stack, A) == before
    still_serves(stack)


def test_gzip_body_of_two_members_is_422(stack) -> None:
    one, two = small_png(), b"second member, silently dropped before"
    r = httpx.post(stack.url + "/run_echo", content=gzip.compress(one) + gzip.compress(two), headers={"Content-Type": "image/png", "Content-Encoding": "gzip", **A}, timeout=30)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "unprocessable" and "after its first member" in r.json()["error"]["message"]
    ok = httpx.post(stack.url + "/run_echo", content=gzip.compress(one), headers={"Content-Type": "image/png", "Content-Encoding": "gzip", **A}, timeout=30)
    assert ok.status_code == 200 and ok.json()["bytes"] == len(one), ok.text
    still_serves(stack)


# ---------------------------------------------------------------- 9. GET / needs a key unless a browser asks for the page
def test_index_lists_endpoints_only_with_a_key(stack) -> None:
    for accept in (None, "*/*", "application/json"):
        r = httpx.get(stack.url + "/", headers={"Accept": accept} if accept else {}, timeout=10)
        assert r.status_code == 401, (accept, r.status_code, r.text[:200])
        assert "/run_textmask" not in r.text and r.json()["error"]["code"] == "unauthorized"
    page = httpx.get(stack.url + "/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}, timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert httpx.get(stack.url + "/models/info", timeout=10).status_code == 401  # the page's own API calls need the key
    r = httpx.get(stack.url + "/", headers=A, timeout=10)
    assert r.status_code == 200 and "POST /run_textmask" in r.json()["endpoints"]
    still_serves(stack)


# ---------------------------------------------------------------- 10. request bodies held at once
def _open_post(stack, length: int, first: bytes) -> socket.socket:
    s = raw_conn(stack)
    s.sendall(f"POST /run_echo HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY_A}\r\nContent-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n".encode() + first)
    return s


def test_bodies_held_at_once_are_capped_with_503(stack) -> None:
    """Two 1.5 MB bodies in flight hold MAX_INFLIGHT_BODY_BYTES=3 MB: a third body gets 503 with
    Retry-After before it is read; the two finish normally, and then the third passes."""
    n = 3 * MB // 2
    slow = [_open_post(stack, n, b"\1" * 1000) for _ in range(2)]
    third = b"\2" * MB
    t_end = time.time() + 15
    while True:
        r = httpx.post(stack.url + "/run_echo", content=third, headers={"Content-Type": "application/octet-stream", **A}, timeout=30)
        if r.status_code == 503:
            break
        assert r.status_code == 200, r.text
        assert time.time() < t_end, "a third body was never refused while two held the budget"
        time.sleep(0.1)
    assert r.json()["error"]["code"] == "overloaded" and "MAX_INFLIGHT_BODY_BYTES" in r.json()["error"]["message"] and r.headers["retry-after"] == "1"
    for s in slow:
        s.sendall(b"\1" * (n - 1000))
        status, _, body = read_response(s)
        assert status == 200 and json.loads(body)["bytes"] == n, body[:300]
        s.close()
    r = httpx.post(stack.url + "/run_echo", content=third, headers={"Content-Type": "application/octet-stream", **A}, timeout=30)
    assert r.status_code == 200 and r.json()["bytes"] == MB, r.text
    still_serves(stack)


# ---------------------------------------------------------------- 11. deployment defaults
def _interpolate(v: str) -> str:
    from tests.helpers.compose import interpolate

    return interpolate(v)


def test_compose_keeps_consoles_unpublished_and_defaults_to_production() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    svc = compose["services"]
    assert "ports" not in svc["minio"], "the MinIO console must not be published by default"
    assert svc["flower"]["profiles"] == ["consoles"]  # not started by a plain `docker compose up`
    assert all(str(p).startswith("127.0.0.1:") for p in svc["flower"]["ports"])
    assert _interpolate(svc["flower"]["environment"]["FLOWER_BASIC_AUTH"]) == ""
    for name in ("api", "worker-cpu", "worker-gpu0", "flower"):
        assert _interpolate(svc[name]["environment"]["ENV"]) == "production", name
    published = {n: s["ports"] for n, s in svc.items() if s.get("ports")}
    assert set(published) == {"api", "flower"}, published


def test_settings_refuse_default_secrets_outside_local(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    Settings(env="local", flower_basic_auth="admin:change-me").require_deployable("api")  # a trial on a trusted machine
    for bad in ({"flower_basic_auth": "admin:change-me"}, {"flower_basic_auth": "ops:s3cret-long-enough,admin:admin"}, {"webhook_secret": "short"}):
        with pytest.raises(ValueError, match="refuses default or weak secrets"):
            Settings(env="production", **bad)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "trifecta-secret")  # compose's MinIO default
    with pytest.raises(ValueError, match="AWS_SECRET_ACCESS_KEY"):
        Settings(env="production")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "a-real-secret-of-the-operator")
    s = Settings(env="production", flower_basic_auth="ops:a-real-password", webhook_secret="w" * 32)
    with pytest.raises(ValueError, match="API_KEYS"):
        s.require_deployable("api")
    Settings(env="production", api_keys="k:t").require_deployable("api")
    s.require_deployable("flower")
    with pytest.raises(ValueError, match="FLOWER_BASIC_AUTH"):
        Settings(env="production").require_deployable("flower")


def test_api_process_refuses_to_start_open_in_production(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "ENV": "production", "AWS_SECRET_ACCESS_KEY": "a-real-secret-of-the-operator", "API_KEYS": "", "REDIS_URL": "redis://127.0.0.1:1/0"}
    env.pop("API_KEYS_FILE", None)
    p = subprocess.run([sys.executable, "-m", "client.cli", "api", "--port", "1"], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode != 0 and "set API_KEYS or API_KEYS_FILE" in p.stdout + p.stderr, (p.returncode, (p.stdout + p.stderr)[-800:])


def test_kubernetes_placeholders_are_refused_outside_local() -> None:
    """The manifests run with ENV=production; their Secret placeholders stop every process at start."""
    import yaml

    from tasks.settings import Settings

    root = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes" / "base"
    config = yaml.safe_load((root / "config.yaml").read_text())["data"]
    assert config["ENV"] == "production"
    secrets = {k: v for doc in yaml.safe_load_all((root / "secrets.yaml").read_text()) if doc for k, v in (doc.get("stringData") or {}).items()}
    for name in ("API_KEYS", "WEBHOOK_SECRET", "FLOWER_BASIC_AUTH"):
        with pytest.raises(ValueError, match=name):
            Settings(env="production", **{name.lower(): secrets[name]})
    Settings(env="production", api_keys="k" * 32 + ":default", webhook_secret="s" * 32, flower_basic_auth="ops:" + "p" * 20)
