"""Bounded waits and the queue under stress: 503 on a full queue, 504 that can be polled,
expired work dropped unrun, a SIGKILLed worker's requests finished by another worker."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.conftest import with_text

PNG = {"Content-Type": "image/png"}


async def _burst(url: str, n: int, path: str, body: bytes, timeout: float = 90) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=n)) as c:
        return await asyncio.gather(*(c.post(url + path, content=body, headers=PNG) for _ in range(n)))


def test_full_queue_answers_503_before_enqueueing(make_stack) -> None:
    # one echo worker, batch 1, one batch in flight, each request held 1.5 s: the queue fills
    st = make_stack(models=["echo"], env={"MAX_QUEUE_DEPTH": "3", "MAX_BATCH_SIZE": "1", "MAX_CONCURRENCY_PER_GPU": "1"})
    rs = asyncio.run(_burst(st.url, 12, "/run_echo?sleep_ms=1500", b"x" * 10))
    codes = sorted(r.status_code for r in rs)
    assert set(codes) <= {200, 503}, codes
    n503 = codes.count(503)
    assert n503 >= 6, codes  # at most depth (3) + the one prefetched + the one running get in
    r503 = next(r for r in rs if r.status_code == 503)
    assert r503.headers["retry-after"] == "1" and r503.json()["error"]["code"] == "overloaded"
    # nothing rejected was enqueued: only the admitted requests created job records
    assert len(st.redis.keys("tf:job:*")) == codes.count(200)
    assert httpx.post(st.url + "/run_echo", content=b"y", headers=PNG, timeout=30).status_code == 200


def test_timeout_gives_504_with_a_pollable_job(make_stack) -> None:
    st = make_stack(models=["echo"], env={"SYNC_GRACE_S": "30"})
    r = httpx.post(st.url + "/run_echo?sleep_ms=1500&timeout=0.3", content=b"abc", headers=PNG, timeout=30)
    assert r.status_code == 504
    err = r.json()["error"]
    assert err["code"] == "timeout" and err["status_url"] == f"/v1/jobs/{err['job_id']}"
    t_end = time.time() + 20
    while time.time() < t_end:
        j = httpx.get(st.url + err["status_url"]).json()
        if j["status"] == "succeeded":
            break
        time.sleep(0.1)
    assert j["status"] == "succeeded" and j["result"]["meta"]["bytes"] == 3


def test_expired_work_is_dropped_unrun(make_stack) -> None:
    st = make_stack(models=["echo"], env={"SYNC_GRACE_S": "0", "MAX_BATCH_SIZE": "1", "MAX_CONCURRENCY_PER_GPU": "1"})

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as c:
            first = asyncio.create_task(c.post(st.url + "/run_echo?sleep_ms=2000", content=b"a", headers=PNG))
            await asyncio.sleep(0.3)
            late = await c.post(st.url + "/run_echo?timeout=0.5", content=b"b", headers=PNG)
            return [await first, late]

    first, late = asyncio.run(go())
    assert first.status_code == 200 and late.status_code == 504
    jid = late.json()["error"]["job_id"]
    time.sleep(2.5)
    j = httpx.get(st.url + f"/v1/jobs/{jid}").json()
    assert j["status"] == "failed" and j["error"]["code"] == "deadline_exceeded"
    assert j["result"] is None


def test_killed_worker_requests_finish_on_another(make_stack) -> None:
    st = make_stack(models=["echo", "echo"], env={"VISIBILITY_TIMEOUT_S": "4", "MAX_BATCH_SIZE": "2", "MAX_CONCURRENCY_PER_GPU": "1"})
    victim = st.workers[0]

    async def go() -> tuple[list[httpx.Response], float]:
        async with httpx.AsyncClient(timeout=90) as c:
            tasks = [asyncio.create_task(c.post(st.url + "/run_echo?sleep_ms=2500", content=f"r{i}".encode(), headers=PNG)) for i in range(6)]
            await asyncio.sleep(1.0)  # both workers are mid-batch now
            victim.kill()
            t_kill = time.time()
            rs = await asyncio.gather(*tasks)
            return rs, time.time() - t_kill

    rs, after = asyncio.run(go())
    assert [r.status_code for r in rs] == [200] * 6, [r.text for r in rs]
    assert sorted(r.json()["bytes"] for r in rs) == [2] * 6
    assert after < 30, f"redelivery took {after:.1f}s"
    survivor = st.workers[1].name
    ids = [r.json()["job_id"] for r in rs]
    redone = [i for i in ids if int(st.redis.hget(f"tf:job:{i}", "attempts")) == 2]
    assert redone, "some requests were in the killed worker's batch and ran twice"
    for i in redone:
        assert httpx.get(st.url + f"/v1/jobs/{i}").json()["result"]["worker"] == survivor


def test_facemask_204_until_served_and_health_fields(make_stack) -> None:
    st = make_stack(models=["textmask"])
    data, _ = with_text()
    r = httpx.post(st.url + "/run_facemask", content=data, headers=PNG)
    assert r.status_code == 204 and r.content == b""
    h = httpx.get(st.url + "/health").json()
    for k in ("status", "ready", "model_loaded", "gpu_available", "gpu_count", "gpu_memory_mb", "queue_size", "active_sessions"):
        assert k in h
    assert h["status"] == "healthy" and h["ready"] is True and h["model_loaded"] is True and h["gpu_available"] is False
    assert h["queues"]["textmask"]["workers"] == [st.workers[0].name]
    info = httpx.get(st.url + "/models/info").json()["models"]["textmask"]
    assert info["warm"] is True and info["input_size"] == 736 and info["devices"] == ["cpu"]
    assert "PP-OCRv4" in info["source"] and info["max_batch_size"] == 4
    r = httpx.post(st.url + "/run_segmentation", content=data, headers=PNG)
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_worker"
    r = httpx.post(st.url + "/run_nothing", content=data, headers=PNG)
    assert r.status_code == 404


def test_batch_sizes_are_valid_and_give_the_same_masks(make_stack) -> None:
    """The same four photos through MAX_BATCH_SIZE=1 and 8: batched model calls give the very
    masks (byte for byte) the one-at-a-time calls give."""
    imgs = [with_text(n) for n in ("chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png")]
    from storage import codecs

    masks: dict[str, list[bytes]] = {}
    for batch in ("1", "8"):
        st = make_stack(models=["textmask"], env={"MAX_BATCH_SIZE": batch, "BATCH_TIMEOUT_MS": "20"})

        async def go(url: str) -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as c:
                return await asyncio.gather(*(c.post(url + "/run_textmask", content=d, headers=PNG) for d, _ in imgs))

        rs = asyncio.run(go(st.url))
        sizes = []
        for r, (_, gt) in zip(rs, imgs, strict=True):
            assert r.status_code == 200
            m = codecs.decode_packbits(r.content)
            assert m.shape == gt.shape and m[gt].sum() / max(1, m.sum()) > 0.85
            sizes.append(httpx.get(st.url + f"/v1/jobs/{r.headers['x-job-id']}").json()["result"]["timing"]["batch_size"])
        assert max(sizes) <= int(batch)
        if batch == "8":
            assert max(sizes) >= 2, sizes  # requests arriving together ran as one model call
        masks[batch] = [r.content for r in rs]
        st.stop()  # one textmask worker at a time on a small machine
    assert masks["8"] == masks["1"]  # the packbits bytes of each photo's mask, batched or not
