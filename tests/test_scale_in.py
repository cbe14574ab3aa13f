"""Scale-in without loss (`make chaos`): a worker sent SIGTERM under load stops taking work,
finishes its running batches, gives back what it received but never ran, hands over its
private queue (requests moved to the shared queue, video-session calls answered 410),
deregisters and exits within WORKER_SHUTDOWN_GRACE_S; every request is answered once.

Real parts: Redis, two (or three) `echo` worker processes holding decode-only video
sessions (VIDEO_SESSION_MODEL=echo), the API. Requests reach a worker's private queue
through the API's own `Hub.submit(queue=...)`, as SAM3 image affinity routes them.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import json
import os
import re
import signal
import threading
import time

import httpx
import pytest

from client.benchkit import Proc, Stack
from tasks import keys
from tests.conftest import wait_job
from tests.helpers.videos import write_video

pytestmark = pytest.mark.slow
OCTET = {"Content-Type": "application/octet-stream"}
B = 60.0
GRACE = 10


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def sigterm(w: Proc) -> float:
    """SIGTERM now; `w.exited_at` records when the process ended (a watcher thread). Returns when it was sent."""
    assert w.p is not None
    p = w.p
    t0 = time.monotonic()
    w.exited_at = None  # type: ignore[attr-defined]

    def watch() -> None:
        p.wait()
        w.exited_at = time.monotonic()  # type: ignore[attr-defined]

    threading.Thread(target=watch, daemon=True).start()
    os.kill(p.pid, signal.SIGTERM)
    return t0


def assert_left(st: Stack, w: Proc, sent_at: float, model: str = "echo", rc: int = 0, grace: float = GRACE) -> None:
    """Exited on its own within the grace period of the SIGTERM (plus a margin for the
    interpreter's own exit), deregistered, its private queue empty."""
    assert w.p is not None
    w.p.wait(max(0.1, sent_at + grace + 5 - time.monotonic()))
    wait_until(lambda: w.exited_at is not None, 5, "the watcher did not see the exit")  # type: ignore[attr-defined]
    assert w.exited_at - sent_at < grace + 5, w.tail()  # type: ignore[attr-defined]
    assert w.p.returncode == rc, w.tail()
    assert not st.redis.exists(keys.worker(w.name)) and not st.redis.sismember(keys.WORKERS, w.name)
    assert st.redis.llen(keys.private_queue(model, w.name)) == 0
    st.workers.remove(w)


def runs_by_job(st: Stack) -> collections.Counter[str]:
    """How many times each job id was run to its end, from every worker's log (one line per finished request)."""
    n: collections.Counter[str] = collections.Counter()
    for log in st.tmp.glob("worker-*.log"):
        n.update(re.findall(r"job=(\w+) model=echo device=\S+ status=\w+ queue_ms", log.read_text(errors="replace")))
    return n


def handed_over(st: Stack, queue: str) -> tuple[int, int]:
    """(moved, answered) from `queue`, summed over every process's log (the worker and the API both hand over)."""
    moved = answered = 0
    for log in st.tmp.glob("*.log"):
        for m, a in re.findall(rf"private queue {re.escape(queue)} handed over: (\d+) moved to \S+, (\d+) session calls answered", log.read_text(errors="replace")):
            moved, answered = moved + int(m), answered + int(a)
    return moved, answered


def record(st: Stack, jid: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in st.redis.hgetall(keys.job(jid)).items()}


async def submit_private(st: Stack, queue: str, payloads: list[tuple[bytes, int]]) -> list[str]:
    """Jobs put on a worker's private queue by the API's own code path (SAM3 image affinity does this)."""
    from api.hub import Hub
    from tasks.settings import Settings

    hub = Hub(Settings(redis_url=st.env["REDIS_URL"]))
    reqs = [
        hub.new_request("echo", tenant="default", kind="job", params={"sleep_ms": ms}, fmt="png", timeout_s=600, inp={"b64": base64.b64encode(data).decode(), "size": len(data)}, write_result_json=True)
        for data, ms in payloads
    ]
    await hub.submit(reqs, queue=queue)
    await hub.redis.aclose()
    return [q.id for q in reqs]


def running_on(st: Stack, worker: str, jids: list[str]) -> bool:
    pipe = st.redis.pipeline(transaction=False)
    for j in jids:
        pipe.hmget(keys.job(j), ["worker", "status"])
    return any(w == worker.encode() and s == b'"running"' for w, s in pipe.execute())


def wait_until(cond, timeout: float = 20, what: str = "") -> None:  # noqa: ANN001
    t_end = time.time() + timeout
    while not cond():
        assert time.time() < t_end, what
        time.sleep(0.05)


# ---------------------------------------------------------------- under load
def test_sigterm_under_load_every_request_answered_once(make_stack) -> None:
    """BULK_DRAIN off: kombu prefetches MAX_BATCH_SIZE per slot, so the leaving worker holds
    buffered messages it never ran; they go back (their START undone) and run elsewhere once."""
    env = {"MAX_BATCH_SIZE": "4", "BATCH_TIMEOUT_MS": "4", "BULK_DRAIN": "false", "WORKER_SHUTDOWN_GRACE_S": str(GRACE), "MAX_QUEUE_DEPTH": "1000", "WORKER_HEARTBEAT_S": "1"}
    st = make_stack(models=["echo", "echo"], env=env)
    victim, survivor = st.workers
    n_sync, n_jobs = 80, 30
    sync_out: dict[int, httpx.Response] = {}
    job_ids: dict[int, str] = {}
    left_at: list[float] = []

    async def one_sync(c: httpx.AsyncClient, i: int) -> None:
        sync_out[i] = await c.post(st.url + "/run_echo?sleep_ms=150", content=b"sync-%d" % i, headers=OCTET)

    async def one_job(c: httpx.AsyncClient, i: int) -> None:
        body = {"model": "echo", "input": {"image": base64.b64encode(b"job-%d" % i).decode()}, "params": {"sleep_ms": 150}}
        r = await c.post(st.url + "/v1/jobs", json=body)
        assert r.status_code == 202, r.text
        job_ids[i] = r.json()["job_id"]

    async def load() -> None:
        async with httpx.AsyncClient(timeout=B, limits=httpx.Limits(max_connections=200)) as c:
            tasks = []
            for i in range(max(n_sync, n_jobs)):
                if i < n_sync:
                    tasks.append(asyncio.create_task(one_sync(c, i)))
                if i < n_jobs:
                    tasks.append(asyncio.create_task(one_job(c, i)))
                if i == n_sync // 3:  # mid-stream, the victim busy
                    await asyncio.to_thread(wait_until, lambda: running_on(st, victim.name, list(job_ids.values())), 20, "the victim never got work")
                    left_at.append(sigterm(victim))
                await asyncio.sleep(0.02)
            await asyncio.gather(*tasks)

    asyncio.run(load())
    assert_left(st, victim, left_at[0])
    for i, r in sorted(sync_out.items()):
        assert r.status_code == 200, (i, r.text)
        assert r.json()["digest"] == digest(b"sync-%d" % i) and r.json()["bytes"] == len(b"sync-%d" % i)
    assert len(sync_out) == n_sync
    assert {r.headers["x-worker"] for r in sync_out.values()} == {victim.name, survivor.name}  # both took part
    for i, jid in sorted(job_ids.items()):
        j = wait_job(st.url, jid, 60)
        assert j["status"] == "succeeded", j
        assert j["result"]["meta"]["digest"] == digest(b"job-%d" % i)
        assert j["result"]["worker"] in (victim.name, survivor.name)
    runs = runs_by_job(st)
    sync_ids = {r.json()["job_id"] for r in sync_out.values()}
    every = sync_ids | set(job_ids.values())
    assert len(every) == n_sync + n_jobs
    assert {j: runs[j] for j in every if runs[j] != 1} == {}, "each request runs to its end exactly once"
    assert sum(runs.values()) == n_sync + n_jobs
    # given back unrun = not a delivery: every record counts exactly one
    assert {j: record(st, j).get("attempts") for j in every if record(st, j).get("attempts") != "1"} == {}
    files = sorted(p for p in (st.tmp / "data" / "default" / "jobs").rglob("result.json"))
    assert len(files) == n_jobs and {json.loads(p.read_bytes())["job_id"] for p in files} == set(job_ids.values())
    assert st.redis.llen("echo") == 0 and st.redis.hlen("unacked") == 0
    victim_log = victim.log.read_text()
    assert "leaving (SIGTERM, warm shutdown): deregistered" in victim_log
    # the survivor still answers, and the API lists it alone
    r = httpx.post(st.url + "/run_echo", content=b"after", headers=OCTET, timeout=B)
    assert r.status_code == 200 and r.headers["x-worker"] == survivor.name and r.json()["digest"] == digest(b"after")
    assert httpx.get(st.url + "/health", timeout=B).json()["queues"]["echo"]["workers"] == [survivor.name]
    st.stop()


# ---------------------------------------------------------------- the private queue
@pytest.fixture(scope="module")
def session_stack(make_stack, tmp_path_factory: pytest.TempPathFactory) -> Stack:
    videos = tmp_path_factory.mktemp("videos")
    write_video(videos / "shapes.mp4")
    env = {"VIDEO_SESSION_MODEL": "echo", "ALLOWED_INPUT_ROOTS": str(videos), "WORKER_SHUTDOWN_GRACE_S": str(GRACE), "WORKER_HEARTBEAT_S": "1", "MAX_QUEUE_DEPTH": "100"}
    st = make_stack(models=["echo", "echo"], env=env)
    st.videos = videos  # type: ignore[attr-defined]
    return st


def test_sigterm_hands_over_the_private_queue(session_stack: Stack) -> None:
    """The victim busy on both slots; waiting on its private queue: three requests (moved to the
    shared queue, run by the survivor) and a call on its video session (410 at once)."""
    st = session_stack
    r = httpx.post(st.url + "/api/v1/video/session/start", json={"video_path": str(st.videos / "shapes.mp4"), "session_id": "s-victim"}, timeout=B)  # type: ignore[attr-defined]
    assert r.status_code == 200, r.text
    victim = next(w for w in st.workers if w.name == r.json()["worker"])
    survivor = next(w for w in st.workers if w is not victim)
    private = keys.private_queue("echo", victim.name)
    busy = asyncio.run(submit_private(st, private, [(b"long-0", 2500), (b"long-1", 2500)]))
    wait_until(lambda: all(record(st, j).get("worker") == victim.name and json.loads(record(st, j)["status"]) == "running" for j in busy), 20, "the victim is not busy")
    waiting = asyncio.run(submit_private(st, private, [(b"moved-%d" % i, 0) for i in range(3)]))

    async def session_call() -> httpx.Response:
        async with httpx.AsyncClient(timeout=B) as c:
            return await c.get(st.url + "/api/v1/video/session/s-victim/status")

    async def scenario() -> tuple[httpx.Response, float]:
        call = asyncio.create_task(session_call())
        await asyncio.to_thread(wait_until, lambda: st.redis.llen(private) == 4, 10, "the session call did not reach the private queue")
        t = sigterm(victim)
        return await call, t

    answer, t0 = asyncio.run(scenario())
    assert answer.status_code == 410, answer.text
    err = answer.json()["error"]
    assert err["code"] == "gone" and victim.name in err["message"] and "start a new session" in err["message"]
    # (a 410, not the 504 the call would get after SESSION_CALL_TIMEOUT_S had nobody answered it)
    assert_left(st, victim, t0)
    for j in busy:  # the running batches finished on the victim
        rec = wait_job(st.url, j, 30)
        assert rec["status"] == "succeeded" and rec["result"]["worker"] == victim.name and rec["attempts"] == 1, rec
    for i, j in enumerate(waiting):  # moved, run once by the survivor
        rec = wait_job(st.url, j, 30)
        assert rec["status"] == "succeeded" and rec["result"]["worker"] == survivor.name and rec["attempts"] == 1, rec
        assert rec["result"]["meta"]["digest"] == digest(b"moved-%d" % i)
    runs = runs_by_job(st)
    assert [runs[j] for j in busy + waiting] == [1] * 5
    assert handed_over(st, private) == (3, 1)  # by the victim itself, or by the API's poller if it got there first
    # the session is gone for good (the API forgot it), and new sessions go to the survivor
    assert httpx.get(st.url + "/api/v1/video/session/s-victim/status", timeout=B).status_code == 404
    r = httpx.post(st.url + "/api/v1/video/session/start", json={"video_path": str(st.videos / "shapes.mp4")}, timeout=B)  # type: ignore[attr-defined]
    assert r.status_code == 200 and r.json()["worker"] == survivor.name, r.text
    assert httpx.delete(f"{st.url}/api/v1/video/session/{r.json()['session_id']}", timeout=B).json()["closed"] is True


def test_stragglers_on_a_departed_workers_queue_are_handed_over_by_the_api(session_stack: Stack) -> None:
    """A request that reaches a private queue after its worker left (an API that had not polled
    yet, or kombu restoring a dead worker's message) is moved by the API's poller."""
    st = session_stack
    gone = "echo-gone"  # a worker the API saw, then lost
    w = st.start_worker("echo", gone)
    st.wait_live("echo", 2)
    w.kill()  # SIGKILL: no hand-over of its own; its registration expires (3 × WORKER_HEARTBEAT_S + 1)
    st.workers.remove(w)
    wait_until(lambda: not st.redis.exists(keys.worker(gone)), 15, "the registration did not expire")
    [jid] = asyncio.run(submit_private(st, keys.private_queue("echo", gone), [(b"straggler", 0)]))
    rec = wait_job(st.url, jid, 30)
    assert rec["status"] == "succeeded" and rec["result"]["meta"]["digest"] == digest(b"straggler") and rec["attempts"] == 1, rec
    assert st.redis.llen(keys.private_queue("echo", gone)) == 0


def test_still_busy_at_the_grace_period_gives_back_its_running_work(session_stack: Stack) -> None:
    """WORKER_SHUTDOWN_GRACE_S passes mid-batch: the worker gives back the message it runs
    (at once, not after the visibility timeout) and exits; the request runs on a live worker."""
    st = session_stack
    survivor = st.workers[0]
    slow = st.start_worker("echo", "echo-slow", env={"WORKER_SHUTDOWN_GRACE_S": "2"})
    st.wait_live("echo", 2)
    [jid] = asyncio.run(submit_private(st, keys.private_queue("echo", slow.name), [(b"too-long", 6000)]))
    # running in a batch (not merely received): the registration's in_flight, written at each heartbeat
    wait_until(lambda: st.redis.hget(keys.worker(slow.name), "in_flight") == b"1", 20, "the slow worker did not start it")
    assert_left(st, slow, sigterm(slow), rc=1, grace=2)
    assert "still busy 2 s after it began leaving" in slow.log.read_text()
    rec = wait_job(st.url, jid, 30)
    assert rec["status"] == "succeeded" and rec["result"]["worker"] == survivor.name and rec["attempts"] == 2, rec
    assert rec["result"]["meta"]["digest"] == digest(b"too-long")
