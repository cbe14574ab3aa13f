"""Workers check input URIs again before reading (defence in depth behind the API's check).

Messages are put on the queue directly (`tasks.wire.build_message`, as the API builds them),
so nothing but the worker stands between them and the input. A URI out of the message's
tenant's reach — another tenant's staged object, a path outside ALLOWED_INPUT_ROOTS, a
bucket off INPUT_URI_ALLOWLIST, another scheme — fails its job with 403 `input_forbidden`,
and nothing is read: local targets are FIFOs (an open for reading would block, and a
non-blocking open for writing tells whether anyone has one open), and the S3 endpoint is a
recorder of every request it gets.

Real parts: Redis, an echo worker process (it digests the bytes it was given), the API.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson
import pytest

from tasks import jobstore, keys
from tasks.schemas import InferRequest
from tasks.wire import build_message

TENANT = "tenantA"


class _Recorder(BaseHTTPRequestHandler):
    """An S3 endpoint that answers NoSuchKey to everything and remembers what it was asked."""

    seen: list[str] = []

    def _missing(self) -> None:
        _Recorder.seen.append(f"{self.command} {self.path}")
        body = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message></Error>'
        self.send_response(404)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = do_POST = _missing  # noqa: N815

    def log_message(self, *a: object) -> None:
        pass


@pytest.fixture(scope="module")
def s3_recorder():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    allowed, outside = tmp_path_factory.mktemp("allowed"), tmp_path_factory.mktemp("outside")
    (allowed / "ok.bin").write_bytes(b"allowed local bytes")
    os.mkfifo(outside / "secret")
    (allowed / "escape").symlink_to(outside / "secret")  # resolves outside the root
    return allowed, outside


@pytest.fixture(scope="module")
def stack(make_stack, s3_recorder: str, roots: tuple[Path, Path]):
    env = {"ALLOWED_INPUT_ROOTS": str(roots[0]), "S3_ENDPOINT_URL": s3_recorder, "INPUT_URI_ALLOWLIST": "s3://open-bkt/in"}
    return make_stack(models=["echo"], env=env)


def _record(stack, jid: str, model: str, tenant: str, now: float) -> None:
    stack.redis.hset(keys.job(jid), mapping=jobstore.new_record({"id": jid, "model": model, "kind": "job", "tenant": tenant, "created_at": now, "params": {}}))
    stack.redis.expire(keys.job(jid), 600)


def enqueue(stack, uri: str, tenant: str = TENANT) -> str:
    jid, now = uuid.uuid4().hex, time.time()
    req = InferRequest.model_validate(
        {"id": jid, "model": "echo", "input": {"uri": uri}, "params": {}, "format": "png", "deadline": now + 120, "tenant": tenant, "kind": "job", "out_prefix": f"{tenant}/jobs/{jid}", "created": now}
    )
    _record(stack, jid, "echo", tenant, now)
    q = keys.shared_queue("echo")
    stack.redis.lpush(q, build_message(keys.TASK_INFER, jid, {"req": req.model_dump(exclude_none=True)}, q))
    return jid


def wait_record(stack, jid: str, timeout: float = 60) -> dict:
    """The job record as the worker left it (read from Redis: the API shows tenantA's jobs only to tenantA's key)."""
    t_end = time.time() + timeout
    while time.time() < t_end:
        rec = jobstore.parse_record(stack.redis.hgetall(keys.job(jid)))
        if rec["status"] in keys.TERMINAL:
            return rec
        time.sleep(0.1)
    raise AssertionError(f"job {jid} not finished: {rec}")


def never_opened(fifo: Path) -> bool:
    """True when no process has the FIFO open for reading (a reader blocked in open() counts as one)."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
        return e.errno == errno.ENXIO
    os.close(fd)
    return False


def staged_fifo(stack, tenant: str) -> Path:
    d = stack.tmp / "data" / tenant / "jobs" / "x" / "_in"
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "input").exists():
        os.mkfifo(d / "input")
    return d / "input"


def test_worker_refuses_inputs_out_of_the_tenants_reach_before_reading(stack, roots: tuple[Path, Path]) -> None:
    allowed, outside = roots
    theirs = staged_fifo(stack, "tenantB")
    _Recorder.seen.clear()
    refused = [
        "key:tenantB/jobs/x/_in/input",  # another tenant's staged upload
        f"key:{TENANT}/../tenantB/jobs/x/_in/input",
        f"key:{TENANT}",
        f"file://{outside}/secret",  # outside ALLOWED_INPUT_ROOTS
        f"file://{allowed}/escape",  # a symlink in the root pointing out of it
        f"{outside}/secret",
        "s3://other-bkt/in/x.png",  # off the allowlist (storage is file://, so no own S3 prefix)
        "s3://open-bkt/in-evil/x.png",  # the allowlist matches whole segments
        "http://169.254.169.254/latest/meta-data/",
    ]
    jobs = {uri: enqueue(stack, uri) for uri in refused}
    for uri, jid in jobs.items():
        rec = wait_record(stack, jid)
        assert rec["status"] == "failed", (uri, rec)
        assert rec["error"]["code"] == "input_forbidden" and rec["error"]["status"] == 403, (uri, rec["error"])
        assert "refused to read" in rec["error"]["message"] and len(rec["error"]["message"]) < 600, rec["error"]
        assert rec["result"] is None
    assert never_opened(theirs) and never_opened(outside / "secret")
    assert _Recorder.seen == []  # no S3 request went out
    # the same worker reads what the tenant may read: its own staged object, a file under the root
    mine = stack.tmp / "data" / TENANT / "jobs" / "y" / "_in"
    mine.mkdir(parents=True)
    (mine / "input").write_bytes(b"tenant A's own upload")
    for uri, data in ((f"key:{TENANT}/jobs/y/_in/input", b"tenant A's own upload"), (f"file://{allowed}/ok.bin", b"allowed local bytes")):
        rec = wait_record(stack, enqueue(stack, uri))
        assert rec["status"] == "succeeded", (uri, rec)
        assert rec["result"]["meta"] == {"bytes": len(data), "digest": hashlib.blake2b(data, digest_size=8).hexdigest()}
    # and an allowlisted S3 URI does reach the endpoint (so the empty record above means something)
    rec = wait_record(stack, enqueue(stack, "s3://open-bkt/in/x.png"))
    assert rec["status"] == "failed" and rec["error"]["code"] == "not_found", rec
    assert _Recorder.seen == ["GET /open-bkt/in/x.png"]


def test_shard_message_for_another_tenants_object_fails_its_shard_with_403(stack) -> None:
    theirs = staged_fifo(stack, "tenantB")
    jid, now = uuid.uuid4().hex, time.time()
    _record(stack, jid, "echo", TENANT, now)
    stack.redis.hset(keys.shards(jid), "n", 1)
    q = keys.shard_queue("echo")
    kw = {"job": jid, "index": 0, "uri": "key:tenantB/jobs/x/_in/input", "model": "echo", "format": "png", "params": {}, "tenant": TENANT, "out_prefix": f"{TENANT}/jobs/{jid}", "created": now}
    stack.redis.lpush(q, build_message(keys.TASK_SHARD, f"{jid}.0", kw, q))
    rec = wait_record(stack, jid)
    assert rec["status"] == "failed" and rec["error"]["code"] == "no_samples", rec
    (shard,) = rec["result"]["shards"]
    assert shard["status"] == "failed" and shard["error"]["code"] == "input_forbidden", shard
    assert never_opened(theirs)
    manifest = orjson.loads((stack.tmp / "data" / TENANT / "jobs" / jid / "shards" / "00000-input.manifest.json").read_bytes())
    assert manifest["error"]["code"] == "input_forbidden" and manifest["samples"] == []
