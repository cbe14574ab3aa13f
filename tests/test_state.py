"""What a request leaves behind: lifetimes of records and stored outputs, the expiry-index
janitor, and a Redis at its maxmemory.

Real parts: a Redis of this module's own (memory is measured server-wide), real worker and
API processes, moto's S3 server, the real textmask model.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from client.bench_state import TRANSIENT, growth, redis_state
from client.benchkit import Stack
from storage import codecs
from storage.blob import FileStore, S3Store
from tasks import jobstore, keys
from tasks.embedded_redis import EmbeddedRedis
from tests.conftest import make_bucket, stopped, wait_job, with_text

SYNC_TTL = 4
BASE_ENV = {"MAX_BATCH_SIZE": "4", "BATCH_TIMEOUT_MS": "4", "INTRA_OP_THREADS": "1"}


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory):
    srv = EmbeddedRedis(tmp_path_factory.mktemp("state-redis"), appendonly=False).start()
    yield srv
    srv.stop()


def _stack(url: str, tmp: Path, model_dir: Path, models: list[str], env: dict[str, str]) -> Stack:
    st = Stack.create(url, tmp, env={**BASE_ENV, **env}, model_dir=model_dir)
    for m in models:
        st.start_worker(m, f"{m}-{uuid.uuid4().hex[:6]}")
    st.start_api()
    for m in set(models):
        st.wait_live(m)
    return st


@pytest.fixture(scope="module")
def short(own_redis: EmbeddedRedis, model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Sync records kept SYNC_TTL seconds, the janitor every half second."""
    st = _stack(own_redis.url, tmp_path_factory.mktemp("short"), model_dir, ["echo", "textmask"], {"SYNC_RESULT_TTL_S": str(SYNC_TTL), "JANITOR_INTERVAL_S": "0.5", "MAX_QUEUE_DEPTH": "1000"})
    yield st
    st.stop()


def _data(st: Stack) -> Path:
    return Path(st.env["STORAGE_URL"][len("file://") :])


def _gone(r: redis.Redis, key: str, timeout: float = 20) -> None:
    t_end = time.time() + timeout
    while r.exists(key):
        assert time.time() < t_end, f"{key} still there (ttl {r.ttl(key)})"
        time.sleep(0.1)


# ---------------------------------------------------------------- 1. answered sync requests
def test_answered_sync_request_keeps_a_short_record_no_tombstone_then_404(short: Stack) -> None:
    r = short.redis
    body = os.urandom(3000)
    resp = httpx.post(short.url + "/run_echo", content=body, headers={"Content-Type": "application/octet-stream"}, timeout=30)
    assert resp.status_code == 200
    jid = resp.headers["X-Job-Id"]
    ttl = r.ttl(keys.job(jid))
    assert 0 < ttl <= SYNC_TTL  # the record's lifetime was shortened when it finished in time
    assert r.exists(keys.tomb(jid)) == 0
    assert r.hexists(keys.job(jid), "detached") == 0
    assert r.memory_usage(keys.job(jid)) > 0  # it exists while its lifetime lasts...
    j = httpx.get(f"{short.url}/v1/jobs/{jid}", timeout=10)
    assert j.status_code == 200 and j.json()["status"] == "succeeded" and j.json()["result"]["meta"]["bytes"] == 3000
    _gone(r, keys.job(jid))  # ...and no longer
    assert r.memory_usage(keys.job(jid)) is None
    j = httpx.get(f"{short.url}/v1/jobs/{jid}", timeout=10)
    assert j.status_code == 404 and j.json()["error"]["code"] == "job_not_found"
    assert "unknown or expired" in j.json()["error"]["message"] and f"kept {SYNC_TTL} s" in j.json()["error"]["message"]
    assert httpx.get(short.url + "/health", timeout=5).status_code == 200


def test_sync_textmask_outputs_expire_with_their_record(short: Stack) -> None:
    r = short.redis
    png, gt = with_text()
    resp = httpx.post(short.url + "/run_textmask", content=png, headers={"Content-Type": "image/png"}, timeout=60)
    assert resp.status_code == 200
    jid = resp.headers["X-Job-Id"]
    mask = codecs.decode_packbits(resp.content)
    assert mask.shape == gt.shape and mask[gt].mean() > 3 * max(mask[~gt].mean(), 1e-3)  # text found where it was drawn
    prefix = _data(short) / "default" / "jobs" / jid
    stored = sorted(p.name for p in prefix.iterdir())
    assert stored == ["mask.packbits"]  # the staged input was dropped once answered; the mask stays for SYNC_RESULT_TTL_S
    assert np.array_equal(codecs.decode_packbits((prefix / "mask.packbits").read_bytes()), mask)
    score = r.zscore(keys.EXPIRY, f"default/jobs/{jid}")
    assert score is not None and score <= time.time() + SYNC_TTL + 1.5
    assert 0 < r.ttl(keys.job(jid)) <= SYNC_TTL and not r.exists(keys.tomb(jid))
    _gone(r, keys.job(jid))
    t_end = time.time() + 20
    while prefix.exists() or r.zscore(keys.EXPIRY, f"default/jobs/{jid}") is not None:
        assert time.time() < t_end, "the janitor did not delete the expired sync output"
        time.sleep(0.1)
    assert httpx.get(f"{short.url}/v1/jobs/{jid}", timeout=10).status_code == 404


def test_redis_memory_per_answered_sync_request_is_under_100_bytes(short: Stack) -> None:
    from client.bench_state import _load, settle, small_jpeg

    r = short.redis
    jpeg = small_jpeg()
    # warm-up at the same concurrency: connection pools and script caches belong in the baseline
    _load(short.url, "/run_echo", b"y" * 1024, "application/octet-stream", 8, 200)
    _load(short.url, "/run_textmask", jpeg, "image/jpeg", 2, 8)
    settle(r)
    before = redis_state(r)
    n_echo, n_text = 2000, 40
    assert _load(short.url, "/run_echo", b"y" * 1024, "application/octet-stream", 8, n_echo).ok == n_echo
    assert _load(short.url, "/run_textmask", jpeg, "image/jpeg", 2, n_text).ok == n_text
    during = redis_state(r)
    assert during["keys"] > before["keys"]  # records live their SYNC_RESULT_TTL_S (the earliest have expired already)
    settle(r)
    after = redis_state(r)
    per = (after["data"] - before["data"]) / (n_echo + n_text)
    left = growth(before, after)
    assert left == {"new_keys": [], "grown": {}}, left  # no key, set, sorted set, list, stream or hash left growing
    assert set(after["per_key"]) - TRANSIENT == set(before["per_key"]) - TRANSIENT  # the same keys (the janitor's lock and kombu's in-flight hash come and go)
    assert after["key_bytes"] - before["key_bytes"] < 20 * 1024  # the keys' own memory back where it was (registration fields vary a little)
    assert per < 100, (per, before["data"], after["data"])
    assert not any(_data(short).rglob("*.packbits"))  # and no stored mask outlived its record


# ---------------------------------------------------------------- the 504 → job race, both orders
def test_sync_504_becomes_a_job_with_long_ttl_and_tombstone(short: Stack) -> None:
    r = short.redis
    resp = httpx.post(short.url + "/run_echo?sleep_ms=1500&timeout=0.3", content=b"slow", headers={"Content-Type": "application/octet-stream"}, timeout=30)
    assert resp.status_code == 504
    jid = resp.json()["error"]["job_id"]
    # detached before the worker finished (DETACH then FINISH)
    assert r.hget(keys.job(jid), "detached") == b"1"
    assert r.ttl(keys.job(jid)) > 86_000
    assert r.get(keys.tomb(jid)) == b"default" and r.ttl(keys.tomb(jid)) > 86_400 + 6 * 86_400
    j = wait_job(short.url, jid, 30)
    assert j["status"] == "succeeded" and j["result"]["meta"]["bytes"] == 4
    assert r.ttl(keys.job(jid)) > 86_000  # FINISH kept the job lifetime
    time.sleep(SYNC_TTL + 1)
    assert httpx.get(f"{short.url}/v1/jobs/{jid}", timeout=10).json()["status"] == "succeeded"


def _record(r: redis.Redis, jid: str, ttl: int = 86_400) -> None:
    r.hset(keys.job(jid), mapping=jobstore.new_record({"id": jid, "model": "echo", "kind": "sync", "tenant": "default", "created_at": time.time(), "params": {}}))
    r.expire(keys.job(jid), ttl)


def _finish(r: redis.Redis, jid: str, sync_ttl: int | str = 2, inline: str = "") -> int:
    return r.eval(jobstore.FINISH_LUA, 1, keys.job(jid), "succeeded", jobstore.now(), "result", b'{"outputs": []}', "", "", sync_ttl, inline)


def _detach(r: redis.Redis, jid: str, force: str = "") -> bytes:
    return r.eval(jobstore.DETACH_LUA, 2, keys.job(jid), keys.tomb(jid), 86_400, 86_400 + keys.TOMBSTONE_S, "default", force)


def test_finish_and_detach_race_lands_right_in_either_order(redis_server) -> None:
    r = redis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/15")
    r.flushdb()
    try:
        # FINISH first: short lifetime; the API's DETACH then finds it finished and answers it (no 504)
        a = uuid.uuid4().hex
        _record(r, a)
        assert _finish(r, a) == 1 and 0 < r.ttl(keys.job(a)) <= 2
        assert _detach(r, a) == b"succeeded"
        assert 0 < r.ttl(keys.job(a)) <= 2 and not r.exists(keys.tomb(a))
        # ...unless another request of the same call timed out: then it is forced into a job too
        assert _detach(r, a, force="1") == b"detached"
        assert r.ttl(keys.job(a)) > 86_000 and r.ttl(keys.tomb(a)) > 86_400 + 6 * 86_400
        # DETACH first: FINISH keeps the job lifetime
        b = uuid.uuid4().hex
        _record(r, b)
        assert _detach(r, b) == b"detached"
        assert _finish(r, b) == 1
        assert r.ttl(keys.job(b)) > 86_000 and r.exists(keys.tomb(b))
        assert r.hget(keys.job(b), "status") == b'"succeeded"'
        # DETACH first, outputs meant to travel inline only (STORE_SYNC_RESULTS=false): FINISH refuses (-1), the worker stores and finishes again
        c = uuid.uuid4().hex
        _record(r, c)
        assert _detach(r, c) == b"detached"
        assert _finish(r, c, inline="1") == -1 and r.hget(keys.job(c), "status") == b'"queued"'
        assert _finish(r, c) == 1 and r.ttl(keys.job(c)) > 86_000
        # a job's FINISH (no sync TTL) never touches the lifetime
        d = uuid.uuid4().hex
        _record(r, d, ttl=5000)
        assert _finish(r, d, sync_ttl="") == 1 and 4000 < r.ttl(keys.job(d)) <= 5000
        assert _detach(r, uuid.uuid4().hex) == b"missing"
    finally:
        r.flushdb()
        r.close()


def test_hub_answers_requests_found_finished_as_the_wait_ran_out(redis_server) -> None:
    """The other order end to end: the wait ran out, but the worker had finished (FINISH before
    DETACH): the API answers the result instead of a 504 and the record keeps the sync lifetime."""
    from api.hub import Hub
    from tasks.settings import Settings

    url = f"redis://127.0.0.1:{redis_server.port}/15"

    async def go() -> tuple[list[dict], int, int]:
        hub = Hub(Settings(redis_url=url))
        await hub.redis.flushdb()
        try:
            q = hub.new_request("echo", tenant="default", kind="sync", params={}, fmt="packbits", timeout_s=1, inp={"b64": "", "size": 0}, reply=True)
            await hub.submit([q])
            await hub.redis.delete(keys.shared_queue("echo"))  # no worker: the test plays it
            await hub.redis.eval(jobstore.FINISH_LUA, 1, keys.job(q.id), "succeeded", jobstore.now(), "result", b'{"meta": {"bytes": 0}, "outputs": []}', "", "", 2, "")
            fut = asyncio.get_running_loop().create_future()
            hub.waiters[q.id] = fut  # the reply was missed (no subscription): the record stands in
            assert await hub._detach([q], [fut]) is False
            out = await hub._late_replies([q], [fut])
            return out, await hub.redis.ttl(keys.job(q.id)), await hub.redis.exists(keys.tomb(q.id))
        finally:
            await hub.redis.flushdb()
            await hub.redis.aclose()

    out, ttl, tomb = asyncio.run(go())
    assert out[0]["status"] == "succeeded" and out[0]["result"]["meta"] == {"bytes": 0}
    assert 0 < ttl <= 2 and tomb == 0


# ---------------------------------------------------------------- 2. STORE_SYNC_RESULTS=false
@pytest.fixture(scope="module")
def nostore(own_redis: EmbeddedRedis, model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    url = own_redis.url.rsplit("/", 1)[0] + "/2"
    st = _stack(url, tmp_path_factory.mktemp("nostore"), model_dir, ["textmask"], {"STORE_SYNC_RESULTS": "false", "SYNC_RESULT_TTL_S": "30", "JANITOR_INTERVAL_S": "0.5", "WORKER_HEARTBEAT_S": "2"})
    yield st
    st.stop()


def test_store_sync_results_false_writes_nothing_and_answers_the_same_mask(nostore: Stack) -> None:
    st = nostore
    png, gt = with_text()
    data = _data(st)
    resp = httpx.post(st.url + "/run_textmask", content=png, headers={"Content-Type": "image/png"}, timeout=60)
    assert resp.status_code == 200
    jid = resp.headers["X-Job-Id"]
    mask = codecs.decode_packbits(resp.content)
    assert mask.shape == gt.shape and mask[gt].mean() > 3 * max(mask[~gt].mean(), 1e-3)
    assert not (data / "default" / "jobs" / jid).exists()  # nothing stored: not the mask, not the (staged, dropped) input
    rec = httpx.get(f"{st.url}/v1/jobs/{jid}", timeout=10).json()
    out = rec["result"]["outputs"][0]
    assert out["inline"] is True and "url" not in out and "data" not in out  # the record holds no mask bytes
    assert st.redis.memory_usage(keys.job(jid)) < 4096
    g = httpx.get(f"{st.url}/v1/jobs/{jid}/result", timeout=10)
    assert g.status_code == 410 and "STORE_SYNC_RESULTS=false" in g.json()["error"]["message"]
    # the same image as a job: stored, and the same mask (the worker encodes both the same way)
    j = httpx.post(st.url + "/v1/jobs", json={"model": "textmask", "input": {"image": base64.b64encode(png).decode()}}, timeout=30).json()["job_id"]
    assert wait_job(st.url, j, 60)["status"] == "succeeded"
    stored = httpx.get(f"{st.url}/v1/jobs/{j}/result", timeout=10)
    assert stored.status_code == 200 and np.array_equal(codecs.decode_packbits(stored.content), mask)
    # tar batches too: every sample's mask in the answer, nothing stored
    import io
    import tarfile

    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w") as tf:
        for name in ("a.png", "b.png"):
            ti = tarfile.TarInfo(name)
            ti.size = len(png)
            tf.addfile(ti, io.BytesIO(png))
    before = sorted(p.name for p in (data / "default" / "jobs").iterdir())
    tr = httpx.post(st.url + "/run_textmask", content=bio.getvalue(), headers={"Content-Type": "application/x-tar"}, timeout=60)
    assert tr.status_code == 200
    masks = [codecs.decode_packbits(b) for b in codecs.decode_batch(tr.content)]
    assert len(masks) == 2 and all(np.array_equal(m, mask) for m in masks)
    assert sorted(p.name for p in (data / "default" / "jobs").iterdir()) == before
    assert httpx.get(st.url + "/health", timeout=5).status_code == 200


def test_store_sync_results_false_504_stores_the_mask_for_the_job(nostore: Stack) -> None:
    st = nostore
    png, _ = with_text()
    w = st.workers[0]
    with stopped(st, w, "textmask"):
        resp = httpx.post(st.url + "/run_textmask?timeout=0.5", content=png, headers={"Content-Type": "image/png"}, timeout=30)
    assert resp.status_code == 504
    jid = resp.json()["error"]["job_id"]
    assert st.redis.hget(keys.job(jid), "detached") == b"1"
    j = wait_job(st.url, jid, 60)
    assert j["status"] == "succeeded"
    out = j["result"]["outputs"][0]
    assert not out.get("inline") and out["url"]
    g = httpx.get(f"{st.url}/v1/jobs/{jid}/result", timeout=10)
    assert g.status_code == 200
    m = codecs.decode_packbits(g.content)
    assert m.shape == (300, 451) and m.any()
    assert (_data(st) / "default" / "jobs" / jid / "mask.packbits").is_file()
    assert st.redis.ttl(keys.job(jid)) > 86_000 and st.redis.exists(keys.tomb(jid))


# ---------------------------------------------------------------- 3. the janitor
class Counted:
    """Counts calls of some of a real store's methods (instrumentation, the store stays real)."""

    def __init__(self, obj: object, names: tuple[str, ...]) -> None:
        self.calls: dict[str, list[tuple]] = {n: [] for n in names}
        for n in names:
            orig = getattr(obj, n)

            def wrapped(*a, _orig=orig, _n=n, **kw):  # noqa: ANN002, ANN003, ANN202
                self.calls[_n].append((a, kw))
                return _orig(*a, **kw)

            setattr(obj, n, wrapped)


def test_janitor_deletes_only_the_expired_of_50000_prefixes(redis_server, tmp_path: Path) -> None:
    import redis.asyncio as aioredis

    from api.janitor import sweep

    store = FileStore(str(tmp_path / "store"))
    jobs = store.root / "default" / "jobs"
    jobs.mkdir(parents=True)
    now = time.time()
    ids = [f"{i:032x}" for i in range(50_000)]
    expired = set(ids[::100])  # 500, records gone
    alive_due = set(ids[1::2500])  # 20 due in the index but their records still live (a sync request that became a job)
    for jid in ids:  # written cheaply: a directory and an empty file each
        os.mkdir(jobs / jid)
        open(jobs / jid / "mask.png", "wb").close()
    r = redis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/13")
    r.flushdb()
    pipe = r.pipeline(transaction=False)
    for i, jid in enumerate(ids):
        pipe.zadd(keys.EXPIRY, {f"default/jobs/{jid}": now - 10 if jid in expired or jid in alive_due else now + 3600 + i})
    for jid in alive_due:
        pipe.hset(keys.job(jid), "status", '"succeeded"')
        pipe.expire(keys.job(jid), 500)
    pipe.execute()
    counted = Counted(store, ("list", "delete_prefix", "delete_prefixes", "get", "exists"))

    async def go() -> int:
        ar = aioredis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/13")
        try:
            return await sweep(ar, store)
        finally:
            await ar.aclose()

    try:
        assert asyncio.run(go()) == 500
        c = counted.calls
        assert len(c["delete_prefix"]) == 500 and {a[0].rsplit("/", 1)[1] for a, _ in c["delete_prefix"]} == expired
        assert c["list"] == [] and c["get"] == [] and c["exists"] == []
        assert sorted(os.listdir(jobs)) == sorted(set(ids) - expired)  # exactly the 49,500
        assert r.zcard(keys.EXPIRY) == 49_500
        for jid in alive_due:  # re-scored to their record's own expiry
            assert now + 400 < r.zscore(keys.EXPIRY, f"default/jobs/{jid}") < time.time() + 502
        # a second pass has nothing to do
        assert asyncio.run(go()) == 0 and len(c["delete_prefix"]) == 500
    finally:
        r.flushdb()
        r.close()


def test_janitor_on_s3_lists_only_expired_prefixes_and_deletes_in_batches(moto_s3: str, redis_server) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import redis.asyncio as aioredis

    from api.janitor import sweep

    make_bucket(moto_s3, "state-janitor")
    store = S3Store("state-janitor", "trifecta", moto_s3)
    expired = [uuid.uuid4().hex for _ in range(350)]
    live = [uuid.uuid4().hex for _ in range(50)]
    writes = [(f"default/jobs/{j}/{k}", b"x") for j in expired for k in ("mask.png", "result.json", "_in/input")]
    writes += [(f"acme/jobs/{j}/mask.png", b"y") for j in live] + [("default/uploads/keep.bin", b"z")]
    with ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda kv: store.put(*kv), writes))
    tags = store.client.get_object_tagging(Bucket="state-janitor", Key=f"trifecta/default/jobs/{expired[0]}/mask.png")["TagSet"]
    assert tags == [{"Key": "trifecta", "Value": "job"}]
    assert store.client.get_object_tagging(Bucket="state-janitor", Key="trifecta/default/uploads/keep.bin")["TagSet"] == []
    r = redis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/13")
    r.flushdb()
    now = time.time()
    r.zadd(keys.EXPIRY, {**{f"default/jobs/{j}": now - 5 for j in expired}, **{f"acme/jobs/{j}": now + 3600 for j in live}})
    counted = Counted(store, ("list",))
    deletes = Counted(store.client, ("delete_objects", "list_objects_v2"))

    async def go() -> int:
        ar = aioredis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/13")
        try:
            return await sweep(ar, store)
        finally:
            await ar.aclose()

    try:
        assert asyncio.run(go()) == 1050
        assert sorted(a[0] for a, _ in counted.calls["list"]) == sorted(f"default/jobs/{j}" for j in expired)  # one LIST per expired prefix, nothing else
        sizes = [len(kw["Delete"]["Objects"]) for _, kw in deletes.calls["delete_objects"]]
        assert sizes == [1000, 50]  # batched, at most 1,000 keys a call
        left = sorted(o["Key"] for page in store.client.get_paginator("list_objects_v2").paginate(Bucket="state-janitor") for o in page.get("Contents", []))
        assert left == sorted([f"trifecta/acme/jobs/{j}/mask.png" for j in live] + ["trifecta/default/uploads/keep.bin"])
        assert r.zcard(keys.EXPIRY) == 50
    finally:
        r.flushdb()
        r.close()


def test_storage_lifecycle_rule_is_written_and_keeps_other_rules(moto_s3: str) -> None:
    from client.storage_cmd import lifecycle_days

    make_bucket(moto_s3, "state-lifecycle")
    store = S3Store("state-lifecycle", "results", moto_s3)
    other = {"ID": "logs", "Status": "Enabled", "Filter": {"Prefix": "logs/"}, "Expiration": {"Days": 30}}
    store.client.put_bucket_lifecycle_configuration(Bucket="state-lifecycle", LifecycleConfiguration={"Rules": [other]})
    assert lifecycle_days(86_400) == 2 and lifecycle_days(3 * 86_400 + 1) == 5
    store.apply_lifecycle(lifecycle_days(86_400))
    store.apply_lifecycle(lifecycle_days(86_400))  # twice: replaced, not duplicated
    rules = {r["ID"]: r for r in store.client.get_bucket_lifecycle_configuration(Bucket="state-lifecycle")["Rules"]}
    assert set(rules) == {"logs", "trifecta-job-objects"}
    ours = rules["trifecta-job-objects"]
    assert ours["Expiration"] == {"Days": 2} and ours["Status"] == "Enabled"
    assert ours["Filter"] == {"And": {"Prefix": "results/", "Tags": [{"Key": "trifecta", "Value": "job"}]}}


# ---------------------------------------------------------------- 4. Redis protected and watched
def test_embedded_redis_runs_with_maxmemory_and_noeviction(tmp_path: Path) -> None:
    srv = EmbeddedRedis(tmp_path, appendonly=False, maxmemory="64mb").start()
    try:
        r = redis.Redis.from_url(srv.url)
        cfg = r.config_get("maxmemory*")
        assert cfg["maxmemory"] == str(64 << 20) and cfg["maxmemory-policy"] == "noeviction"
    finally:
        srv.stop()


def test_oom_from_redis_is_a_503_redis_full_and_submit_writes_nothing(tmp_path: Path) -> None:
    from redis.exceptions import OutOfMemoryError

    from api.hub import Hub
    from tasks.errors import RedisFull, translate
    from tasks.settings import Settings

    e = translate(OutOfMemoryError("command not allowed when used memory > 'maxmemory'."))
    assert isinstance(e, RedisFull) and e.status == 503 and e.code == "redis_full" and e.headers["Retry-After"]
    srv = EmbeddedRedis(tmp_path, appendonly=False, maxmemory="4mb").start()
    try:
        r = redis.Redis.from_url(srv.url)
        i = 0
        with pytest.raises(OutOfMemoryError):
            while True:
                r.set(f"filler:{i}", b"x" * 20_000)
                i += 1

        async def go() -> tuple[RedisFull | None, bool]:
            hub = Hub(Settings(redis_url=srv.url))
            hub.redis_ok = True  # as its poller would have it (not started here)
            try:
                q = hub.new_request("echo", tenant="default", kind="job", params={}, fmt="packbits", timeout_s=60, inp={"b64": "aGVsbG8=", "size": 5})
                try:
                    await hub.submit([q])
                except RedisFull as err:
                    return err, hub.redis_ok
                return None, hub.redis_ok
            finally:
                await hub.redis.aclose()

        err, still_ok = asyncio.run(go())
        assert isinstance(err, RedisFull) and err.headers["Retry-After"]
        assert still_ok  # Redis answered (refusing): not "unreachable"
        assert not any(True for _ in r.scan_iter(match="tf:*")) and r.llen("echo") == 0  # all or nothing: no record, no message
    finally:
        srv.stop()


@pytest.mark.slow
def test_full_redis_under_load_gives_clean_503s_and_loses_no_job(model_dir: Path, tmp_path: Path) -> None:
    """Redis with 12 MB of room, a slow echo worker, 8 clients sending jobs with 48 KB inline
    inputs (and a few sync calls): the queue fills Redis, new work gets 503 `redis_full`, and
    every job accepted finishes once the worker drained the queue."""
    from concurrent.futures import ThreadPoolExecutor

    srv = EmbeddedRedis(tmp_path / "redis", appendonly=False).start()
    r = redis.Redis.from_url(srv.url)
    st = _stack(srv.url, tmp_path / "stack", model_dir, ["echo"], {"MAX_QUEUE_DEPTH": "100000", "JANITOR_INTERVAL_S": "0.5"})
    try:
        limit = r.info("memory")["used_memory"] + (12 << 20)
        r.config_set("maxmemory", limit)
        r.config_set("maxmemory-policy", "noeviction")
        img = base64.b64encode(os.urandom(48_000)).decode()  # inline: ~64 KB of base64 in each queued message
        answers: list[tuple[int, dict, dict]] = []
        t_stop = time.time() + 6

        seen: list[tuple[dict, dict[str, float]]] = []  # /health and /metrics while the load runs

        def client(k: int) -> None:
            with httpx.Client(timeout=30) as c:
                while time.time() < t_stop:
                    if k == 0:  # the operator's view
                        h = c.get(st.url + "/health")
                        assert h.status_code == 200
                        m = {line.split(" ")[0]: float(line.split(" ")[1]) for line in c.get(st.url + "/metrics").text.splitlines() if line.startswith("trifecta_redis_")}
                        seen.append((h.json(), m))
                        time.sleep(0.2)
                        continue
                    if k == 1:
                        resp = c.post(st.url + "/run_echo?timeout=2", content=b"q" * 2000, headers={"Content-Type": "application/octet-stream"})
                    else:
                        resp = c.post(st.url + "/v1/jobs", json={"model": "echo", "input": {"image": img}, "params": {"sleep_ms": 100}})
                    body = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {}
                    answers.append((resp.status_code, body, dict(resp.headers)))

        with ThreadPoolExecutor(8) as ex:
            list(ex.map(client, range(8)))
        statuses = {s for s, _, _ in answers}
        assert statuses <= {200, 202, 503, 504}, statuses  # never a 500; a sync call behind the backlog may 504
        full = [(b, h) for s, b, h in answers if s == 503]
        assert full, statuses
        assert all(b["error"]["code"] == "redis_full" and h.get("retry-after") for b, h in full), {b["error"]["code"] for b, _ in full}
        high = [(h, m) for h, m in seen if h["redis_memory"]["high"]]
        assert high, [h["redis_memory"] for h, _ in seen]
        h, m = high[-1]
        assert h["status"] == "degraded" and h["redis_memory"]["maxmemory_bytes"] == limit and h["redis_memory"]["policy"] == "noeviction"
        assert m["trifecta_redis_maxmemory_bytes"] == limit and max(m["trifecta_redis_used_memory_bytes"] for _, m in seen) > 0.8 * limit
        assert m['trifecta_redis_keys{db="db0"}'] >= 1 and 'trifecta_redis_expiring_keys{db="db0"}' in m
        accepted = [b["job_id"] for s, b, _ in answers if s == 202]
        assert accepted
        # the worker drains the queue: every accepted job finishes, none is lost
        for jid in accepted:
            assert wait_job(st.url, jid, 180)["status"] == "succeeded"
        assert st.workers[0].alive() and st.api.alive()
        t_end = time.time() + 30
        while (resp := httpx.post(st.url + "/v1/jobs", json={"model": "echo", "input": {"image": img}}, timeout=10)).status_code == 503:
            assert time.time() < t_end, resp.text  # room again once the queue drained
            time.sleep(0.5)
        assert resp.status_code == 202
        # at maxmemory itself (a burst past the admission ratio, or memory taken by something
        # else): the workers' writes are refused too; they wait, holding their messages, and the
        # jobs finish once there is room again (here: the operator raises maxmemory)
        queued = [httpx.post(st.url + "/v1/jobs", json={"model": "echo", "input": {"image": img}, "params": {"sleep_ms": 100}}, timeout=10).json()["job_id"] for _ in range(12)]
        r.config_set("maxmemory", max(1 << 20, r.info("memory")["used_memory"] - (1 << 20)))
        time.sleep(6)  # past a worker registration's life (3 x WORKER_HEARTBEAT_S + 1)
        refused = httpx.post(st.url + "/v1/jobs", json={"model": "echo", "input": {"image": img}}, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "redis_full" and refused.headers["retry-after"]
        h = httpx.get(st.url + "/health", timeout=5).json()
        assert h["status"] == "degraded" and h["workers"] == 1  # the waiting worker still beats (allow-oom heartbeat)
        r.config_set("maxmemory", limit * 2)
        for jid in queued:
            assert wait_job(st.url, jid, 120)["status"] == "succeeded"
        assert st.workers[0].alive() and st.api.alive()
    finally:
        st.stop()
        srv.stop()
