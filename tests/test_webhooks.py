"""Job webhooks: the signing helpers, the allowlist, the Lua hand-off, and real deliveries to
a real HTTP receiver on 127.0.0.1 (retries with backoff, across an API restart)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import orjson
import pytest
import redis

from tasks import jobstore, keys
from tasks import webhooks as wh
from tasks.embedded_redis import free_port

SECRET = "whsec-test-7c1e"


# ---------------------------------------------------------------- pure helpers
def test_signature_is_hmac_of_timestamp_dot_body_and_verifies() -> None:
    body = b'{"job_id":"abc","status":"succeeded"}'
    h = wh.signature_header(SECRET, body, t=1_700_000_000)
    assert h == "t=1700000000,v1=" + hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert wh.verify(SECRET, h, body, now=1_700_000_100)
    assert not wh.verify(SECRET, h, body + b" ", now=1_700_000_100)  # tampered body
    assert not wh.verify("other", h, body, now=1_700_000_100)  # wrong key
    assert not wh.verify(SECRET, h, body, now=1_700_000_000 + 301)  # replayed too late
    assert not wh.verify(SECRET, h.replace("t=1700000000", "t=1700000050"), body, now=1_700_000_050)  # a fresh t does not re-sign
    assert not wh.verify(SECRET, None, body) and not wh.verify(SECRET, "v1=abc", body) and not wh.verify(SECRET, "garbage", body)
    # key rotation: a receiver accepts any of several v1 entries
    rotated = f"{h},v1={'0' * 64}"
    assert wh.verify(SECRET, rotated, body, now=1_700_000_000)


def test_allowlist_matches_exact_hosts_ports_and_wildcards_only() -> None:
    allowed = ["hooks.example.com", "127.0.0.1:9000", "*.acme.io"]
    assert wh.match_allowed("https://hooks.example.com/x", allowed) == "exact"
    assert wh.match_allowed("http://127.0.0.1:9000/cb?x=1", allowed) == "exact"
    assert wh.match_allowed("https://a.b.acme.io/cb", allowed) == "wildcard"
    for bad, why in [
        ("http://127.0.0.1:9001/cb", "not in WEBHOOK_ALLOWED_HOSTS"),
        ("http://169.254.169.254/latest/meta-data", "not in WEBHOOK_ALLOWED_HOSTS"),
        ("https://acme.io/cb", "not in WEBHOOK_ALLOWED_HOSTS"),  # the apex is not *.acme.io
        ("https://evil-acme.io/cb", "not in WEBHOOK_ALLOWED_HOSTS"),
        ("https://hooks.example.com.evil.net/", "not in WEBHOOK_ALLOWED_HOSTS"),
        ("ftp://hooks.example.com/x", "http:// or https://"),
        ("https://user:pw@hooks.example.com/", "credentials"),
        ("https:///nohost", "no host"),
        ("http://[::1:80/", "not a valid URL"),
    ]:
        with pytest.raises(ValueError, match=why.replace("?", r"\?")):
            wh.match_allowed(bad, allowed)
    with pytest.raises(ValueError, match="disabled"):
        wh.match_allowed("https://hooks.example.com/", [])


def test_wildcard_targets_must_resolve_to_public_addresses() -> None:
    allowed = ["*.acme.io"]
    wh.check_target("https://api.acme.io/cb", allowed, resolver=lambda h, p: ["93.184.216.34"])
    for ips in (["10.0.0.5"], ["127.0.0.1"], ["169.254.169.254"], ["93.184.216.34", "192.168.1.2"], ["::ffff:10.1.2.3"], []):
        with pytest.raises(ValueError, match="non-public"):
            wh.check_target("https://api.acme.io/cb", allowed, resolver=lambda h, p, ips=ips: ips)


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    d = [wh.backoff_s(n, 2.0, cap_s=20, jitter=0) for n in range(1, 7)]
    assert d == [2.0, 4.0, 8.0, 16.0, 20.0, 20.0]
    assert all(1.6 <= wh.backoff_s(1, 2.0) <= 2.4 for _ in range(50))


def test_finishing_script_queues_jobs_with_a_callback_once(redis_server) -> None:
    r = redis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/15")
    r.flushdb()
    finish, cancel = r.register_script(jobstore.FINISH_LUA), r.register_script(jobstore.CANCEL_LUA)
    for jid, cb in (("a" * 32, "http://127.0.0.1:1/cb"), ("b" * 32, None), ("c" * 32, "http://127.0.0.1:1/cb")):
        r.hset(keys.job(jid), mapping=jobstore.new_record({"id": jid, "model": "echo", "tenant": "default", "callback_url": cb}))
    assert finish(keys=[keys.job("a" * 32)], args=["succeeded", 1.0, "result", b"{}", "", ""]) == 1
    assert finish(keys=[keys.job("a" * 32)], args=["failed", 2.0, "error", b"{}", "", ""]) == 0  # already final: not queued twice
    assert finish(keys=[keys.job("b" * 32)], args=["succeeded", 1.0, "result", b"{}", "", ""]) == 1
    assert cancel(keys=[keys.job("c" * 32)], args=[1.0]) == b"cancelled"
    assert r.lrange(keys.WEBHOOK_QUEUE, 0, -1) == [b"c" * 32, b"a" * 32]
    r.flushdb()


# ---------------------------------------------------------------- a real receiver
class Receiver:
    """A tiny HTTP server on 127.0.0.1 that records every POST and answers from a script."""

    def __init__(self) -> None:
        self.port = free_port()
        self.got: list[dict[str, Any]] = []
        self.fail_next: dict[str, int] = {}  # job id → how many more 500s to answer
        self.cond = threading.Condition()
        rec = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hdrs = {k.lower(): v for k, v in self.headers.items()}
                job = hdrs.get("x-trifecta-job-id", "")
                with rec.cond:
                    status = 500 if rec.fail_next.get(job, 0) > 0 else 200
                    if status == 500:
                        rec.fail_next[job] -= 1
                    rec.got.append({"path": self.path, "headers": hdrs, "body": body, "answered": status, "at": time.time()})
                    rec.cond.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *a: object) -> None:
                pass

        self.srv = ThreadingHTTPServer(("127.0.0.1", self.port), H)
        self.thread = threading.Thread(target=self.srv.serve_forever, daemon=True)
        self.thread.start()

    def for_job(self, job_id: str) -> list[dict[str, Any]]:
        with self.cond:
            return [g for g in self.got if g["headers"].get("x-trifecta-job-id") == job_id]

    def wait(self, job_id: str, n: int, timeout: float = 20) -> list[dict[str, Any]]:
        t_end = time.time() + timeout
        with self.cond:
            while len([g for g in self.got if g["headers"].get("x-trifecta-job-id") == job_id]) < n:
                left = t_end - time.time()
                assert left > 0, f"{n} deliveries for {job_id} not received; got {self.got}"
                self.cond.wait(left)
        return self.for_job(job_id)

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture(scope="module")
def receiver():
    rc = Receiver()
    yield rc
    rc.close()


@pytest.fixture(scope="module")
def stack(make_stack, receiver):
    env = {
        "WEBHOOK_SECRET": SECRET, "WEBHOOK_ALLOWED_HOSTS": f"127.0.0.1:{receiver.port},hooks.example.com",
        "WEBHOOK_BACKOFF_S": "0.3", "WEBHOOK_MAX_ATTEMPTS": "5", "MAX_CONCURRENCY_PER_GPU": "1", "MAX_BATCH_SIZE": "1",
    }
    return make_stack(models=["echo"], env=env)


def _submit(st, receiver, payload: bytes = b"hello", **params: Any) -> str:
    body = {"model": "echo", "input": {"image": base64.b64encode(payload).decode()}, "params": params, "callback_url": f"http://127.0.0.1:{receiver.port}/hooks/trifecta?src=test"}
    r = httpx.post(st.url + "/v1/jobs", json=body, timeout=10)
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def _check_signed(d: dict[str, Any]) -> None:
    sig = d["headers"]["x-trifecta-signature"]
    parts = dict(p.split("=", 1) for p in sig.split(","))
    t = int(parts["t"])
    assert abs(time.time() - t) < 60
    assert parts["v1"] == hmac.new(SECRET.encode(), f"{t}.".encode() + d["body"], hashlib.sha256).hexdigest()
    assert wh.verify(SECRET, sig, d["body"])


def test_job_webhook_is_signed_retried_with_backoff_and_matches_the_status(stack, receiver) -> None:
    st = stack
    t0 = time.time()
    jid = _submit(st, receiver)
    receiver.fail_next[jid] = 1  # the first delivery gets a 500: it must be retried
    got = receiver.wait(jid, 2)
    assert [g["answered"] for g in got] == [500, 200]
    assert got[0]["path"] == "/hooks/trifecta?src=test"
    assert got[1]["at"] - got[0]["at"] >= 0.3 * 0.8 - 0.05  # WEBHOOK_BACKOFF_S, minus the jitter
    for n, d in enumerate(got, 1):
        _check_signed(d)
        assert d["headers"]["content-type"] == "application/json"
        assert d["headers"]["x-trifecta-event"] == "job.succeeded"
        assert d["headers"]["x-trifecta-delivery"] == f"{jid}.{n}"
    body = json.loads(got[1]["body"])
    assert body == httpx.get(f"{st.url}/v1/jobs/{jid}", timeout=5).json()
    assert body["job_id"] == jid and body["status"] == "succeeded" and body["model"] == "echo"
    assert body["result"]["meta"]["bytes"] == 5 and body["result"]["meta"]["digest"] == hashlib.blake2b(b"hello", digest_size=8).hexdigest()
    assert "tenant" not in body and body["callback_url"].endswith("src=test")
    state = {k.decode(): v.decode() for k, v in st.redis.hgetall(keys.webhook(jid)).items()}
    assert state["status"] == "delivered" and state["attempts"] == "2" and float(state["delivered_at"]) > t0
    assert st.redis.zscore(keys.WEBHOOK_SCHEDULE, jid) is None and st.redis.llen(keys.WEBHOOK_QUEUE) == 0
    time.sleep(0.5)
    assert len(receiver.for_job(jid)) == 2  # delivered: no more attempts


@pytest.mark.parametrize(
    ("url", "code", "words"),
    [
        ("http://10.0.0.7/hook", 422, "not in WEBHOOK_ALLOWED_HOSTS"),
        ("http://169.254.169.254/latest/meta-data/", 422, "not in WEBHOOK_ALLOWED_HOSTS"),
        ("http://localhost:6379/", 422, "not in WEBHOOK_ALLOWED_HOSTS"),
        ("file:///etc/passwd", 422, "http:// or https://"),
        ("http://u:p@hooks.example.com/x", 422, "credentials"),
    ],
)
def test_callback_outside_the_allowlist_is_refused_at_submit(stack, url: str, code: int, words: str) -> None:
    body = {"model": "echo", "input": {"image": base64.b64encode(b"x").decode()}, "callback_url": url}
    r = httpx.post(stack.url + "/v1/jobs", json=body, timeout=10)
    assert r.status_code == code and words in r.json()["error"]["message"], r.text
    assert httpx.get(stack.url + "/health", timeout=5).json()["ready"] is True


def test_cancelled_job_is_notified_too(stack, receiver) -> None:
    st = stack
    blocker = _submit(st, receiver, b"block", sleep_ms=1500)  # holds the only worker slot
    time.sleep(0.3)
    queued = _submit(st, receiver, b"queued")
    r = httpx.delete(f"{st.url}/v1/jobs/{queued}", timeout=5)
    assert r.json()["status"] == "cancelled"
    (d,) = receiver.wait(queued, 1)
    _check_signed(d)
    assert d["headers"]["x-trifecta-event"] == "job.cancelled" and json.loads(d["body"])["status"] == "cancelled"
    (b,) = receiver.wait(blocker, 1)
    assert json.loads(b["body"])["status"] == "succeeded"


def test_retries_survive_an_api_restart(stack, receiver) -> None:
    st = stack
    jid = _submit(st, receiver)
    receiver.fail_next[jid] = 10**6  # refuse until the API is gone
    receiver.wait(jid, 1)
    t_end = time.time() + 10
    while st.redis.hget(keys.webhook(jid), "status") != b"retrying":  # the sender has scheduled its retry
        assert time.time() < t_end
        time.sleep(0.02)
    st.api.stop()
    n_down = len(receiver.for_job(jid))
    assert st.redis.zscore(keys.WEBHOOK_SCHEDULE, jid) is not None  # the retry is in Redis, not in the dead process
    receiver.fail_next[jid] = 0
    time.sleep(0.5)
    assert len(receiver.for_job(jid)) == n_down  # nobody sends while no API runs
    st.start_api()
    got = receiver.wait(jid, n_down + 1)
    assert got[-1]["answered"] == 200 and json.loads(got[-1]["body"])["status"] == "succeeded"
    _check_signed(got[-1])
    assert orjson.loads(st.redis.hget(keys.webhook(jid), "attempts")) == n_down + 1
