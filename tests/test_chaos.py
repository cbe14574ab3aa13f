"""Fault tests (`make chaos`, also run by CI): nothing is lost when workers die, Redis
restarts or storage fails; a poison task is dead-lettered; long tasks are not redelivered
while their worker lives; overload gives only 200/503/504."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from client.benchkit import Stack
from tasks.embedded_redis import EmbeddedRedis, free_port
from tests.conftest import make_bucket, wait_job, with_text
from tests.helpers import faults

pytestmark = pytest.mark.slow
PNG = {"Content-Type": "image/png"}



def submit(url: str, data: bytes, model: str = "textmask", params: dict | None = None) -> str:
    r = httpx.post(url + "/v1/jobs", json={"model": model, "input": {"image": base64.b64encode(data).decode()}, "params": params or {"format": "png"}}, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def test_kill_9_mid_batch_twenty_times(make_stack) -> None:
    env = {"VISIBILITY_TIMEOUT_S": "3", "TEXTMASK_LIMIT_SIDE_LEN": "1024", "MAX_BATCH_SIZE": "2", "MAX_CONCURRENCY_PER_GPU": "1"}
    st = make_stack(models=["textmask", "textmask"], env=env)
    data, gt = with_text("chelsea.png")
    kills, redelivered, all_jobs = 0, 0, []
    for round_ in range(20):
        victim = st.workers[0]
        jobs = [submit(st.url, data) for _ in range(3)]
        all_jobs += jobs
        t_end = time.time() + 30
        while time.time() < t_end:  # until the victim is mid-batch on one of them
            if any(st.redis.hget(f"tf:job:{j}", "worker") == victim.name.encode() and json.loads(st.redis.hget(f"tf:job:{j}", "status")) == "running" for j in jobs):
                break
            time.sleep(0.02)
        else:
            raise AssertionError("the victim never picked up work")
        victim.kill()
        kills += 1
        st.workers.remove(victim)
        st.start_worker("textmask", f"tm-r{round_}", env=env, wait=False)  # the replacement joins the back of the list
        st.workers.append(st.workers.pop(0))  # ... and the survivor becomes the next victim
        for j in jobs:
            try:
                res = wait_job(st.url, j, 60)
            except AssertionError:
                r = st.redis
                print("DIAG queue", [m[:0] or len(m) for m in r.lrange("textmask", 0, -1)], "unacked", r.hlen("unacked"), "index", r.zrange("unacked_index", 0, -1, withscores=True), "now", time.time(), "mutex", r.get("unacked_mutex"), r.ttl("unacked_mutex"), "workers", r.smembers("tf:workers"), [w.name for w in st.workers], [w.alive() for w in st.workers], "keys", r.keys("*"))
                raise
            assert res["status"] == "succeeded", res
            redelivered += res["attempts"] > 1
    assert kills == 20 and redelivered >= 20  # every killed batch was redone on a live worker
    for j in all_jobs:
        files = sorted(p.name for p in (st.tmp / "data" / "default" / "jobs" / j).iterdir() if p.is_file())
        assert files == ["mask.png", "result.json"], files  # written once, at fixed keys
        m = httpx.get(st.url + f"/v1/jobs/{j}/result")
        assert m.status_code == 200 and len(m.content) > 100


def test_poison_task_is_dead_lettered_after_max_deliveries(make_stack) -> None:
    env = {"VISIBILITY_TIMEOUT_S": "2", "MAX_DELIVERIES": "3", **faults.env(TRIFECTA_CRASH_ECHO="1")}  # the poison: tests/helpers/faults
    st = make_stack(models=["echo"], env=env)
    jid = submit(st.url, b"boom", model="echo", params={"crash": True})
    restarts = 0
    t_end = time.time() + 90
    while time.time() < t_end:
        j = httpx.get(st.url + f"/v1/jobs/{jid}").json()
        if j["status"] == "failed":
            break
        if not any(w.alive() for w in st.workers):  # a supervisor would restart it; so do we
            restarts += 1
            st.start_worker("echo", f"echo-again-{restarts}", env=env)
        time.sleep(0.2)
    assert j["status"] == "failed" and j["error"]["code"] == "dead_lettered", j
    assert restarts == 3 and j["attempts"] == 4
    assert st.redis.llen("tf:deadletter") == 1
    assert httpx.post(st.url + "/run_echo", content=b"ok", headers=PNG, timeout=20).status_code == 200


def test_long_task_not_redelivered_while_its_worker_lives(make_stack) -> None:
    st = make_stack(models=["echo", "echo"], env={"VISIBILITY_TIMEOUT_S": "2", "MAX_BATCH_SIZE": "1"})
    jid = submit(st.url, b"long", model="echo", params={"sleep_ms": 9000})
    j = wait_job(st.url, jid, 40)
    assert j["status"] == "succeeded" and j["attempts"] == 1  # 4.5x the visibility timeout, ran once


def test_redis_restart_under_load(tmp_path: Path, model_dir: Path) -> None:
    srv = EmbeddedRedis(tmp_path / "redis", appendonly=True).start()
    st = Stack.create(srv.url, tmp_path / "stack", env={"MAX_BATCH_SIZE": "1", "SYNC_TIMEOUT_S": "20"}, model_dir=model_dir)
    try:
        st.start_worker("echo", "e1")
        st.start_api()
        st.wait_live("echo")
        queued = [submit(st.url, b"j%d" % i, model="echo", params={"sleep_ms": 300}) for i in range(8)]

        async def load() -> list[int]:
            async with httpx.AsyncClient(timeout=40) as c:
                async def one(i: int) -> int:
                    await asyncio.sleep(i * 0.05)
                    try:
                        return (await c.post(st.url + "/run_echo?sleep_ms=100", content=b"x", headers=PNG)).status_code
                    except httpx.HTTPError:
                        return -1
                return await asyncio.gather(*(one(i) for i in range(60)))

        async def go() -> tuple[list[int], float, list[int]]:
            t = asyncio.create_task(load())
            await asyncio.sleep(0.8)
            srv.stop()  # SIGTERM: Redis writes its append-only file and exits
            t_down = time.time()
            during = []
            async with httpx.AsyncClient(timeout=10) as c:
                for _ in range(5):
                    t0 = time.time()
                    r = await c.post(st.url + "/run_echo", content=b"x", headers=PNG)
                    during.append((r.status_code, time.time() - t0))
                    await asyncio.sleep(0.1)
            srv.start()
            return await t, time.time() - t_down, during

        codes, _, during = asyncio.run(go())
        assert all(code == 503 and dt < 1.0 for code, dt in during), during  # fast 503 while Redis is away
        assert set(codes) <= {200, 503}, codes  # in flight: completed or 503, never hung, never 500
        assert codes.count(200) >= 10
        for j in queued:  # queued jobs survived the restart (append-only file) and finished
            assert wait_job(st.url, j, 60)["status"] == "succeeded"
        assert httpx.post(st.url + "/run_echo", content=b"after", headers=PNG, timeout=20).status_code == 200
    finally:
        st.stop()
        srv.stop()


def test_storage_down_fails_job_clearly_without_partial_output(tmp_path: Path, redis_server: EmbeddedRedis, model_dir: Path) -> None:
    from moto.server import ThreadedMotoServer

    port = free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    s3.start()
    endpoint = f"http://127.0.0.1:{port}"
    make_bucket(endpoint, "flaky")
    st = Stack.create(f"redis://127.0.0.1:{redis_server.port}/14", tmp_path, env={"S3_ENDPOINT_URL": endpoint, "S3_MAX_ATTEMPTS": "2", "S3_CONNECT_TIMEOUT_S": "1", "S3_READ_TIMEOUT_S": "2", "INLINE_INPUT_BYTES": "10000000"}, storage="s3://flaky/t", model_dir=model_dir)
    try:
        st.start_worker("textmask", "tm-s3")
        st.start_api()
        st.wait_live("textmask")
        data, _ = with_text()
        ok = submit(st.url, data)
        assert wait_job(st.url, ok)["status"] == "succeeded"
        s3.stop()
        t0 = time.time()
        bad = submit(st.url, data)
        j = wait_job(st.url, bad, 60)
        assert j["status"] == "failed" and j["error"]["code"] == "storage_error" and "after retries" in j["error"]["message"], j
        assert time.time() - t0 < 30
        s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        s3.start()  # moto keeps its state in this process: the bucket is as the worker left it
        import boto3

        keys = [o["Key"] for o in boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket="flaky").get("Contents", [])]
        assert not [k for k in keys if f"/{bad}/" in k]  # nothing half-written for the failed job
        assert [k for k in keys if f"/{ok}/" in k]
    finally:
        st.stop()
        s3.stop()


def test_overload_500_concurrent_gives_only_200_503_504(make_stack) -> None:
    st = make_stack(models=["echo"], env={"MAX_QUEUE_DEPTH": "20", "MAX_BATCH_SIZE": "8", "SYNC_TIMEOUT_S": "3"})
    pid = st.api.p.pid

    def rss() -> float:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6

    before = rss()

    async def go() -> list[int]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=500)) as c:
            async def one() -> int:
                try:
                    return (await c.post(st.url + "/run_echo?sleep_ms=200", content=b"x" * 1000, headers=PNG)).status_code
                except httpx.HTTPError:
                    return -1
            return await asyncio.gather(*(one() for _ in range(500)))

    codes = asyncio.run(go())
    assert set(codes) <= {200, 503, 504}, sorted(set(codes))
    assert codes.count(200) >= 20 and codes.count(503) >= 100
    assert rss() - before < 100
    assert httpx.get(st.url + "/health").status_code == 200


def test_worker_over_memory_limit_exits_cleanly_and_up_restarts_it(tmp_path: Path, model_dir: Path) -> None:
    port = free_port()
    env = {
        **os.environ, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "RUN_DIR": str(tmp_path / "run"), "MODELS": "echo",
        "MODEL_DIR": str(model_dir), "STORAGE_URL": f"file://{tmp_path / 'data'}", "WORKER_MAX_MEMORY_MB": "1", "WORKER_HEARTBEAT_S": "1",
    }
    up = subprocess.Popen([sys.executable, "-m", "client.cli", "up", "--port", str(port), "--no-flower"], env=env, stdout=open(tmp_path / "up.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t_end = time.time() + 60
        while time.time() < t_end:
            try:
                if httpx.get(url + "/health", timeout=1).json().get("ready"):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.3)
        first = httpx.post(url + "/run_echo", content=b"a", headers=PNG, timeout=30)
        assert first.status_code == 200
        w1 = first.json()["job_id"]
        time.sleep(4)  # the worker passed WORKER_MAX_MEMORY_MB: it finished its batch and exited; up restarts it
        t_end = time.time() + 60
        while time.time() < t_end:
            r = httpx.post(url + "/run_echo", content=b"b", headers=PNG, timeout=30)
            if r.status_code == 200:
                break
            time.sleep(0.5)
        assert r.status_code == 200 and r.json()["job_id"] != w1
        log = (tmp_path / "up.log").read_text()
        assert "WORKER_MAX_MEMORY_MB" in log and "restarting" in log
        assert (tmp_path / "run" / "redis" / "appendonly.aof").exists() or (tmp_path / "run" / "redis" / "appendonlydir").exists()
    finally:
        os.killpg(up.pid, signal.SIGINT)
        up.wait(30)
