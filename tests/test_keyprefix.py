"""kombu's `global_keyprefix` (BROKER_GLOBAL_KEYPREFIX) end to end: a real API and a real Celery
worker on one Redis database answer a sync request and a job; every key kombu and our own code
write for the broker (queues, unacked records, bindings) lies under the prefix, and the queue
depths the API reports (`/health`, what its 503 reads; `/metrics`, what dashboards and alerts
read) are the lengths of the prefixed lists. Trifecta's own keys keep their `tf:` prefix."""

from __future__ import annotations

import base64
import hashlib

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tasks import queuekeys
from tasks.settings import Settings
from tests.conftest import stopped, wait_depth, wait_job

PREFIX = "acme-broker:"
OCTET = {"Content-Type": "application/octet-stream"}


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def queue_depth_metric(url: str, queue: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "trifecta_queue_depth" and s.labels.get("queue") == queue:
                return s.value
    raise AssertionError(f"no trifecta_queue_depth for {queue!r}")


@pytest.fixture(scope="module")
def stack(make_stack):  # noqa: ANN001, ANN201
    return make_stack(models=["echo"], env={"BROKER_GLOBAL_KEYPREFIX": PREFIX})


def job(url: str, data: bytes) -> str:
    r = httpx.post(url + "/v1/jobs", json={"model": "echo", "input": {"image": base64.b64encode(data).decode()}}, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def test_sync_and_job_answered_with_every_broker_key_under_the_prefix(stack) -> None:  # noqa: ANN001
    r = httpx.post(stack.url + "/run_echo", content=b"hello prefix", headers=OCTET, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["digest"] == digest(b"hello prefix") and r.json()["bytes"] == 12
    j = wait_job(stack.url, job(stack.url, b"a job under a prefix"), 60)
    assert j["status"] == "succeeded", j
    assert j["result"]["meta"]["digest"] == digest(b"a job under a prefix")
    names = {k.decode() for k in stack.redis.scan_iter(count=1000)}
    broker = {k for k in names if not k.startswith("tf:")}
    assert broker and all(k.startswith(PREFIX) for k in broker), sorted(broker)
    worker = stack.workers[0].name
    # the worker declared its shared and private queues through kombu: their bindings are prefixed
    assert {f"{PREFIX}_kombu.binding.echo", f"{PREFIX}_kombu.binding.echo.{worker}"} <= broker, sorted(broker)
    # and nothing answered from, or left behind in, an unprefixed twin
    assert not names & {"echo", f"echo.{worker}", "unacked", "unacked_index", "_kombu.binding.echo"}


def test_queue_depths_read_the_prefixed_lists(stack) -> None:  # noqa: ANN001
    qk = queuekeys.for_settings(Settings(broker_global_keyprefix=PREFIX))
    key = qk.queue("echo")
    assert key == PREFIX + "echo"
    worker = stack.workers[0]
    with stopped(stack, worker, "echo"):
        ids = [job(stack.url, b"queued-%d" % i) for i in range(4)]
        # a stopped worker's BRPOP, already sent, may have taken the first one: count what waits
        waiting = stack.redis.llen(key)
        assert waiting in (3, 4)
        assert wait_depth(stack.url, "echo", at_least=waiting) == waiting  # the API's own view (its 503 decision)
        assert queue_depth_metric(stack.url, "echo") == waiting  # what KEDA-style dashboards and alerts read
        assert queue_depth_metric(stack.url, f"echo.{worker.name}") == 0
        assert not stack.redis.exists("echo")
    for i, jid in enumerate(ids):
        j = wait_job(stack.url, jid, 60)
        assert j["status"] == "succeeded" and j["result"]["meta"]["digest"] == digest(b"queued-%d" % i), j
    assert wait_depth(stack.url, "echo", at_most=0) == 0 and stack.redis.llen(key) == 0
