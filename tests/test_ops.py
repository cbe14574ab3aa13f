"""Operations, end to end through real processes: Flower on the stack's broker, Prometheus
/metrics (one process and several), every /health and /models/info field, result lifetime."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from client.benchkit import ROOT, Proc
from storage import codecs
from tasks.embedded_redis import free_port
from tests.conftest import fill_queue, stopped, wait_drained, with_text


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    r = httpx.get(url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(m: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    hits = [v for (n, ls), v in m.items() if n == name and want <= set(ls)]
    return sum(hits) if hits else float("nan")


@pytest.fixture(scope="module")
def stack(make_stack):
    # one echo worker that runs one batch at a time, so queued work can outlive its deadline
    st = make_stack(models=["textmask"], env={"SYNC_GRACE_S": "0.3"})
    st.start_worker("echo", "echo-ops", env={"MAX_CONCURRENCY_PER_GPU": "1", "MAX_BATCH_SIZE": "1"})
    st.wait_live("echo")
    return st


def test_flower_shows_the_live_workers_and_their_queues(stack, tmp_path: Path) -> None:
    port = free_port()
    env = {**stack.env, "FLOWER_PORT": str(port), "FLOWER_BASIC_AUTH": "ops:s3cret"}
    fl = Proc("flower", [sys.executable, "-m", "client.cli", "flower"], env, tmp_path / "flower.log").start()
    try:
        base = f"http://127.0.0.1:{port}"
        workers: dict = {}
        t_end = time.time() + 40
        while time.time() < t_end:
            try:
                r = httpx.get(base + "/api/workers", params={"refresh": "1"}, auth=("ops", "s3cret"), timeout=10)
                if r.status_code == 200:
                    workers = {k: v for k, v in r.json().items() if v.get("active_queues")}
                    if len(workers) >= 2:
                        break
            except httpx.HTTPError:
                pass
            assert fl.alive(), fl.tail()
            time.sleep(0.5)
        names = sorted(workers)
        assert any(n.startswith("textmask.") for n in names) and any(n.startswith("echo.echo-ops@") for n in names), names
        echo = next(v for k, v in workers.items() if k.startswith("echo.echo-ops@"))
        queues = {q["name"] for q in echo["active_queues"]}
        assert {"echo", "echo.echo-ops"} <= queues
        assert "trifecta.infer" in echo["registered"]
        # the queues' depths as Flower reads them from the same Redis
        ql = httpx.get(base + "/api/queues/length", auth=("ops", "s3cret"), timeout=10).json()
        depth = {q["name"]: q["messages"] for q in ql["active_queues"]}
        assert depth.get("echo") == 0 and depth.get("echo.echo-ops") == 0 and "textmask" in depth
        # FLOWER_BASIC_AUTH is enforced: no credentials, no page and no API
        assert httpx.get(base + "/api/workers", timeout=5).status_code == 401
        assert httpx.get(base + "/", timeout=5).status_code == 401
        assert httpx.get(base + "/api/workers", auth=("ops", "wrong"), timeout=5).status_code == 401

        # task events are on by default: the workers page's Processed / Succeeded / Failed count each request
        echo_name = next(k for k in workers if k.startswith("echo.echo-ops@"))

        def counts() -> dict:
            rows = httpx.get(base + "/workers", params={"json": "1"}, auth=("ops", "s3cret"), timeout=10).json()["data"]
            return next((w for w in rows if w["hostname"] == echo_name), {})

        before = counts()
        n = 6
        job_ids = []
        for i in range(n):
            r = httpx.post(stack.url + "/run_echo", content=b"flower %d" % i, timeout=10)
            assert r.status_code == 200
            job_ids.append(r.headers["x-job-id"])
        bad = httpx.post(stack.url + "/run_echo?sleep_ms=-5", content=b"x", timeout=10)  # the worker refuses it: 422, a failed task
        assert bad.status_code == 422
        want = {"task-received": n + 1, "task-succeeded": n, "task-failed": 1}
        t_end = time.time() + 20
        while (got := {k: counts().get(k, 0) - before.get(k, 0) for k in want}) != want and time.time() < t_end:
            time.sleep(0.3)
        assert got == want
        tasks = httpx.get(base + "/api/tasks", params={"workername": echo_name}, auth=("ops", "s3cret"), timeout=10).json()
        for jid in job_ids:
            assert tasks[jid]["name"] == "trifecta.infer" and tasks[jid]["state"] == "SUCCESS" and tasks[jid]["worker"] == echo_name
        assert "model': 'echo'" in tasks[job_ids[0]]["kwargs"]

        # a queue's depth as Flower reads it, while its worker cannot take anything
        with stopped(stack, stack.workers[-1], "echo"):
            fill_queue(stack.redis, "echo", "echo", 3)  # no job records: the worker skips them once it runs again
            ql = httpx.get(base + "/api/queues/length", auth=("ops", "s3cret"), timeout=5).json()
        depth = {q["name"]: q["messages"] for q in ql["active_queues"]}
        assert depth["echo"] == 3 and depth["echo.echo-ops"] == 0 and depth["textmask"] == 0
        wait_drained(stack.redis, "echo")
    finally:
        fl.stop()


def test_flower_lists_every_model_queue_with_no_worker_up(make_stack, tmp_path: Path) -> None:
    """The queues are declared to the Celery app Flower loads (tasks/flower_app.py): with no worker
    to name its active queues, the Broker page still lists every model's queue and its backlog."""
    st = make_stack(models=[], api=False)
    fill_queue(st.redis, "segmentation", "segmentation", 2)
    port = free_port()
    fl = Proc("flower", [sys.executable, "-m", "client.cli", "flower"], {**st.env, "FLOWER_PORT": str(port), "FLOWER_UNAUTHENTICATED_API": "true"}, tmp_path / "flower.log").start()
    try:
        base = f"http://127.0.0.1:{port}"
        t_end = time.time() + 40
        depth: dict = {}
        while time.time() < t_end:
            try:
                r = httpx.get(base + "/api/queues/length", timeout=10)
                if r.status_code == 200:
                    depth = {q["name"]: q["messages"] for q in r.json()["active_queues"]}
                    break
            except httpx.HTTPError:
                pass
            assert fl.alive(), fl.tail()
            time.sleep(0.5)
        from tasks.models import MODELS

        assert {m: depth.get(m) for m in MODELS} == {m: 2 if m == "segmentation" else 0 for m in MODELS}
        broker = httpx.get(base + "/broker", timeout=10)  # the Broker page itself (open: no FLOWER_BASIC_AUTH here)
        assert broker.status_code == 200 and ">segmentation<" in broker.text.replace(" ", "")
    finally:
        fl.stop()


def test_metrics_count_requests_rejections_timeouts_and_worker_figures(stack) -> None:
    before = scrape(stack.url)
    data, _ = with_text("coffee.png")
    for _ in range(2):
        r = httpx.post(stack.url + "/run_textmask", content=data, headers={"Content-Type": "image/png"}, timeout=60)
        assert r.status_code == 200
    assert httpx.get(stack.url + "/v1/jobs/" + "e" * 32, timeout=5).status_code == 404
    assert httpx.get(stack.url + "/no/such/page", timeout=5).status_code == 404
    # no segmentation worker in this stack: 503 no_worker
    r = httpx.post(stack.url + "/run_segmentation", content=data, headers={"Content-Type": "image/png"}, timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_worker"
    # the echo worker sleeps 1.5 s: the first request times out (504), the second one's
    # deadline (timeout + SYNC_GRACE_S) passes while it waits, so the worker drops it unrun
    r1 = httpx.post(stack.url + "/run_echo?sleep_ms=1500&timeout=0.3", content=b"x", timeout=10)
    assert r1.status_code == 504 and r1.json()["error"]["code"] == "timeout"
    r2 = httpx.post(stack.url + "/run_echo?timeout=0.2", content=b"y", timeout=10)
    assert r2.status_code == 504
    job2 = r2.json()["error"]["job_id"]
    t_end = time.time() + 10
    while httpx.get(f"{stack.url}/v1/jobs/{job2}", timeout=5).json()["status"] not in ("failed", "succeeded") and time.time() < t_end:
        time.sleep(0.1)
    assert httpx.get(f"{stack.url}/v1/jobs/{job2}", timeout=5).json()["error"]["code"] == "deadline_exceeded"
    time.sleep(1.5)  # a heartbeat (WORKER_HEARTBEAT_S=1) carries the worker's figures to Redis

    m = scrape(stack.url)

    def delta(name: str, **labels: str) -> float:
        b = value(before, name, **labels)
        return value(m, name, **labels) - (0 if b != b else b)

    assert delta("trifecta_http_requests_total", route="/run_textmask", method="POST", status="200") == 2
    assert delta("trifecta_http_requests_total", route="/run_segmentation", status="503") == 1
    assert delta("trifecta_http_requests_total", route="/v1/jobs/{job_id}", method="GET", status="404") == 1  # templates, never raw ids
    assert delta("trifecta_http_requests_total", route="unmatched", status="404") == 1
    assert not [k for k in m if k[0] == "trifecta_http_requests_total" and "eeee" in dict(k[1])["route"]]
    assert value(m, "trifecta_rejected_total", route="/run_segmentation", code="no_worker") == 1
    assert value(m, "trifecta_timeouts_total", route="/run_echo") == 2
    assert value(m, "trifecta_http_request_seconds_count", route="/run_textmask") >= 2
    # live state read from Redis
    assert value(m, "trifecta_redis_up") == 1
    assert value(m, "trifecta_workers_live", model="textmask") == 1 and value(m, "trifecta_workers_live", model="echo") == 1
    assert value(m, "trifecta_queue_depth", queue="textmask") == 0 and value(m, "trifecta_queue_depth", queue="echo.echo-ops") == 0
    assert value(m, "trifecta_active_sessions", model="textmask") == 0
    # each worker's own figures, per worker and device
    tm = [dict(ls)["worker"] for (n, ls), _ in m.items() if n == "trifecta_worker_processed_total" and dict(ls)["model"] == "textmask"]
    assert len(tm) == 1
    w = tm[0]
    assert value(m, "trifecta_worker_processed_total", worker=w) >= 2
    assert value(m, "trifecta_queue_wait_seconds_count", worker=w, device="cpu") >= 2
    assert value(m, "trifecta_model_seconds_count", worker=w) >= 2
    assert value(m, "trifecta_model_seconds_sum", worker=w) > 0
    assert value(m, "trifecta_batch_size_count", worker=w) >= 2 and value(m, "trifecta_batch_size_bucket", worker=w, le="1.0") >= 2
    assert delta("trifecta_worker_dropped_expired_total", worker="echo-ops") == 1
    assert delta("trifecta_worker_failed_total", worker="echo-ops") == 1  # the Flower test's refused request came before
    assert value(m, "trifecta_worker_rss_bytes", worker=w) > 10e6
    # no GPU here: no device-memory series at all
    assert not [k for k in m if k[0] == "trifecta_worker_gpu_memory_bytes"]


def test_sync_fast_path_answers_as_the_routes_do(stack) -> None:
    """POST /run_{model} is served ahead of FastAPI's router (api/fastpath.py): same answers,
    same errors, same metrics labels; other methods and the OpenAPI schema still come from FastAPI."""
    r = httpx.post(stack.url + "/run_echo", content=b"abc", headers={"Content-Type": "image/png", "Accept": "application/json"}, timeout=10)
    assert r.status_code == 200 and r.json()["bytes"] == 3 and r.headers["x-worker"] == "echo-ops"
    bad = httpx.post(stack.url + "/run_echo", content=b"abc", headers={"Content-Type": "text/plain"}, timeout=10)
    assert bad.status_code == 415 and bad.json()["error"]["code"] == "unsupported_media_type"
    # a raw body with no Content-Type, an empty one, or curl's default for --data-binary is application/octet-stream
    for headers in ({}, {"Content-Type": ""}, {"Content-Type": "application/x-www-form-urlencoded"}):
        r = httpx.post(stack.url + "/run_echo", content=b"abcd", headers=headers, timeout=10)
        assert r.status_code == 200 and r.json()["bytes"] == 4, (headers, r.text)
        assert r.request.headers.get("content-type") == headers.get("Content-Type")
    photo_png, _ = with_text("chelsea.png")
    labelled = httpx.post(stack.url + "/run_textmask", content=photo_png, headers={"Content-Type": "image/png"}, timeout=60)
    bare = httpx.post(stack.url + "/run_textmask", content=photo_png, timeout=60)
    assert bare.status_code == labelled.status_code == 200 and bare.content == labelled.content and codecs.decode_packbits(bare.content).sum() > 500
    assert "x-model-untrained" not in bare.headers  # the pretrained PP-OCRv4 det
    # /run_<a name we do not serve>: the documented 404 unknown_model, whatever the method; the service answers afterwards
    for method in ("POST", "GET"):
        r = httpx.request(method, stack.url + "/run_unicorn", content=b"abc", timeout=10)
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_model" and "'unicorn'" in r.json()["error"]["message"], r.text
    r = httpx.post(stack.url + "/run_sam3", content=b"abc", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_model" and "/run_textmask" in r.json()["error"]["message"]
    assert httpx.post(stack.url + "/run_echo", content=b"abc", timeout=10).json()["bytes"] == 3
    fmt = httpx.post(stack.url + "/run_textmask?format=bmp", content=b"abc", headers={"Content-Type": "image/png"}, timeout=10)
    assert fmt.status_code == 400 and "bmp" in fmt.json()["error"]["message"]
    g = httpx.get(stack.url + "/run_echo", timeout=10)
    assert g.status_code == 405 and g.json()["error"]["code"] == "method_not_allowed"
    # an image over INLINE_INPUT_BYTES (64 KiB) waits in Redis (SYNC_REDIS_INPUT_MAX_BYTES), not in
    # the message nor in storage; the mask stays under the job
    data, _ = with_text("coffee.png")
    assert len(data) > 64 << 10
    t = httpx.post(stack.url + "/run_textmask", content=data, headers={"Content-Type": "image/png"}, timeout=60)
    assert t.status_code == 200 and t.headers["x-mask-format"] == "packbits"
    job = Path(stack.env["STORAGE_URL"].removeprefix("file://")) / "default" / "jobs" / t.headers["x-job-id"]
    assert [p.name for p in job.iterdir()] == ["mask.packbits"] and (job / "mask.packbits").read_bytes() == t.content
    paths = httpx.get(stack.url + "/openapi.json", timeout=10).json()["paths"]
    assert {"/run_segmentation", "/run_textmask", "/run_facemask", "/run_echo"} <= set(paths) and "post" in paths["/run_echo"]
    m = scrape(stack.url)
    assert value(m, "trifecta_http_requests_total", route="/run_echo", method="POST", status="415") >= 1
    assert value(m, "trifecta_http_requests_total", route="/run_textmask", method="POST", status="400") >= 1


def test_metrics_add_up_across_api_processes(stack, tmp_path: Path) -> None:
    port = free_port()
    mp = tmp_path / "prom"
    env = {**stack.env, "PROMETHEUS_MULTIPROC_DIR": str(mp)}
    api = Proc("api2", [sys.executable, "-m", "client.cli", "api", "--port", str(port), "--workers", "2"], env, tmp_path / "api2.log").start()
    base = f"http://127.0.0.1:{port}"
    try:
        t_end = time.time() + 30
        while True:
            try:
                if httpx.get(base + "/ping", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < t_end and api.alive(), api.tail()
            time.sleep(0.2)
        before = value(scrape(base), "trifecta_http_requests_total", route="/models/info")
        before = 0 if before != before else before
        for _ in range(30):  # a fresh connection each: both processes take some
            with httpx.Client() as c:
                assert c.get(base + "/models/info", timeout=5).status_code == 200
        for _ in range(3):  # whichever process answers the scrape, it counts all of them
            assert value(scrape(base), "trifecta_http_requests_total", route="/models/info", status="200") == before + 30
        pids = {f.name.split("_")[-1].split(".")[0] for f in mp.glob("counter_*.db")}
        assert len(pids) >= 2, sorted(os.listdir(mp))
    finally:
        api.stop()


def test_health_answers_every_source_field(stack) -> None:
    h = httpx.get(stack.url + "/health", timeout=5).json()
    assert h["status"] == "healthy" and h["ready"] is True and h["model_loaded"] is True and h["redis"] is True
    assert h["gpu_available"] is False and h["gpu_count"] == 0 and h["gpu_memory_mb"] == 0.0
    assert h["queue_size"] == 0 and h["active_sessions"] == 0 and h["workers"] == 2
    assert h["queues"]["textmask"]["depth"] == 0 and len(h["queues"]["textmask"]["workers"]) == 1
    assert h["queues"]["echo"]["depth"] == 0 and h["queues"]["echo"]["workers"] == ["echo-ops"]
    assert set(h["queues"]) == {"textmask", "echo"}


def _next_beat(stack, worker: str) -> dict[str, str]:
    """The worker's registration as its next heartbeat writes it (everything finished before is counted)."""
    key = f"tf:worker:{worker}"
    last = stack.redis.hget(key, "heartbeat")
    t_end = time.time() + 15
    while stack.redis.hget(key, "heartbeat") == last:
        assert time.time() < t_end, f"{worker} does not beat"
        time.sleep(0.05)
    return {k.decode(): v.decode() for k, v in stack.redis.hgetall(key).items()}


def test_models_info_lists_source_revision_devices_size_batching_warm(stack) -> None:
    info = httpx.get(stack.url + "/models/info", timeout=5).json()["models"]
    tm = info["textmask"]
    assert tm["live_workers"] == 1 and tm["devices"] == ["cpu"] and tm["warm"] is True
    assert tm["family"] == "textdet" and tm["input_size"] == 736 and tm["max_batch_size"] == 4 and tm["batch_timeout_ms"] == 4
    assert isinstance(tm["source"], str) and tm["source"] and isinstance(tm["input_size"], int) and tm["input_size"] > 0
    assert "revision" in tm and tm["queue_depth"] == 0
    assert tm["trained"] is True and tm["workers"][0]["trained"] is True  # the PP-OCRv4 det: its SOURCE.json says pretrained
    assert tm["workers"][0]["device"] == "cpu"
    # `processed` counts the worker's requests: two more, seen at the next heartbeat, make it two more
    name = tm["workers"][0]["id"]
    p0 = int(_next_beat(stack, name)["processed"])
    data, _ = with_text()
    for _ in range(2):
        assert httpx.post(stack.url + "/run_textmask", content=data, headers={"Content-Type": "image/png"}, timeout=60).status_code == 200
    assert int(_next_beat(stack, name)["processed"]) == p0 + 2
    t_end = time.time() + 5  # the API reads registrations every POLL_S
    while (got := httpx.get(stack.url + "/models/info", timeout=5).json()["models"]["textmask"]["workers"][0]["processed"]) != p0 + 2 and time.time() < t_end:
        time.sleep(0.1)
    assert got == p0 + 2
    echo = info["echo"]
    assert echo["live_workers"] == 1 and echo["warm"] is True and echo["source"] == "builtin" and echo["max_batch_size"] == 1
    assert echo["trained"] is None  # not a model
    seg = info["segmentation"]
    assert seg["live_workers"] == 0 and seg["devices"] == [] and seg["warm"] is False and seg["source"] is None and seg["trained"] is None


# ---------------------------------------------------------------- result lifetime
@pytest.fixture(scope="module")
def ttl_stack(make_stack):
    return make_stack(models=["echo"], env={"RESULT_TTL_SECONDS": "2", "JANITOR_INTERVAL_S": "0.5"})


def test_expired_job_answers_expired_and_its_stored_objects_are_deleted(ttl_stack) -> None:
    st = ttl_stack
    r = httpx.post(st.url + "/v1/jobs", json={"model": "echo", "input": {"image": base64.b64encode(b"hello").decode()}}, timeout=10)
    assert r.status_code == 202
    job = r.json()["job_id"]
    t_end = time.time() + 10
    while (j := httpx.get(f"{st.url}/v1/jobs/{job}", timeout=5).json())["status"] != "succeeded":
        assert time.time() < t_end, j
        time.sleep(0.05)
    prefix = Path(st.env["STORAGE_URL"][len("file://") :]) / "default" / "jobs" / job
    assert (prefix / "result.json").is_file()
    # an id never issued: 404
    never = "0" * 32
    assert httpx.get(f"{st.url}/v1/jobs/{never}", timeout=5).status_code == 404
    t_end = time.time() + 10
    while (j := httpx.get(f"{st.url}/v1/jobs/{job}", timeout=5)).json()["status"] != "expired":
        assert time.time() < t_end, j.text
        time.sleep(0.2)
    assert j.status_code == 200 and j.json() == {"job_id": job, "status": "expired", "links": {"self": f"/v1/jobs/{job}", "result": f"/v1/jobs/{job}/result"}}
    assert st.redis.ttl(f"tf:tomb:{job}") > 6 * 86400
    while prefix.exists():
        assert time.time() < t_end + 5, sorted(os.listdir(prefix))
        time.sleep(0.2)
    assert httpx.get(f"{st.url}/v1/jobs/{never}", timeout=5).status_code == 404
    r = httpx.get(f"{st.url}/v1/jobs/{job}/result", timeout=5)
    assert r.status_code == 409 and "expired" in r.json()["error"]["message"]


def test_cli_settings_table_lists_the_operations_settings() -> None:
    out = subprocess.run([sys.executable, "-m", "client.cli", "settings"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
    for name in ("FLOWER_PORT", "FLOWER_BASIC_AUTH", "WORKER_METRICS_PORT", "PROMETHEUS_MULTIPROC_DIR", "WEBHOOK_SECRET", "WEBHOOK_ALLOWED_HOSTS", "RESULT_TTL_SECONDS", "JANITOR_INTERVAL_S"):
        assert f"| `{name}` |" in out


def test_janitor_sweeps_expired_prefixes_on_s3(moto_s3: str, redis_server) -> None:
    import asyncio

    import redis.asyncio as aioredis

    from api.janitor import job_prefixes, sweep, sweep_all
    from storage.blob import S3Store
    from tasks import keys
    from tests.conftest import make_bucket

    make_bucket(moto_s3, "janitor")
    store = S3Store("janitor", "trifecta", moto_s3)
    ids = {"expired": "a" * 32, "live": "b" * 32, "orphan": "c" * 32, "other": "d" * 32}
    for tenant, jid in (("default", ids["expired"]), ("default", ids["live"]), ("default", ids["orphan"]), ("acme", ids["other"])):
        for key in ("mask.png", "result.json", "_in/input"):
            store.put(f"{tenant}/jobs/{jid}/{key}", b"x")
    store.put("default/uploads/keep.bin", b"x")  # not a job prefix: never touched
    assert sorted(job_prefixes(store)) == sorted([("default", ids["expired"]), ("default", ids["live"]), ("default", ids["orphan"]), ("acme", ids["other"])])

    async def go(full: bool = False) -> int:
        r = aioredis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/14")
        try:
            if full:
                return await sweep_all(r, store)
            await r.flushdb()
            now = time.time()
            # the expiry index: due entries of records gone are deleted, a due entry whose record lives is re-scored
            await r.zadd(keys.EXPIRY, {f"default/jobs/{ids['expired']}": now - 1, f"acme/jobs/{ids['other']}": now - 1, f"default/jobs/{ids['live']}": now - 1, "../jobs/x": now - 1})
            await r.hset(keys.job(ids["live"]), "status", '"succeeded"')
            await r.expire(keys.job(ids["live"]), 100)
            return await sweep(r, store)  # the orphan (no index entry) is left to the lifecycle rule or a full sweep
        finally:
            if full:
                await r.flushdb()
            await r.aclose()

    assert asyncio.run(go()) == 6
    left = sorted(store.list("default") + store.list("acme"))
    assert left == sorted([f"default/jobs/{ids[k]}/{f}" for k in ("live", "orphan") for f in ("_in/input", "mask.png", "result.json")] + ["default/uploads/keep.bin"])
    # `trifecta storage sweep --all`: everything listed, the orphan (no record) goes, the live job stays
    assert asyncio.run(go(full=True)) == 3
    assert sorted(store.list("default") + store.list("acme")) == sorted([f"default/jobs/{ids['live']}/{f}" for f in ("_in/input", "mask.png", "result.json")] + ["default/uploads/keep.bin"])


def test_live_collector_reports_gpu_memory_caches_and_sessions() -> None:
    import orjson
    from prometheus_client import CollectorRegistry, generate_latest

    from api.hub import WorkerInfo
    from api.metrics import LiveCollector, _worker_metrics

    reg_field = orjson.dumps({"dropped_expired": 3, "histograms": {"batch_size": {"buckets": [["1.0", 2.0], ["2.0", 5.0], ["+Inf", 5.0]], "sum": 8.0, "count": 5.0}}}).decode()
    gpu = WorkerInfo("sam3-gpu1", "sam3", "cuda:1", ["sam3", "sam3.sam3-gpu1"], {"feature_cache": {"hits": 7, "misses": 2, "entries": 1}}, time.time(), in_flight=1, processed=9, gpu_memory_mb=4536.5, raw={"sessions": "2", "batches": "4", "metrics": reg_field})
    cpu = WorkerInfo("tm-0", "textmask", "cpu", ["textmask", "textmask.tm-0"], {}, time.time(), raw={})
    snap = {"workers": [gpu, cpu], "depths": {"sam3": 4, "sam3.sam3-gpu1": 1}, "webhook": {"queued": 2, "scheduled": 1}, "redis_up": True, "models": ["sam3", "textmask"]}
    reg = CollectorRegistry()
    reg.register(LiveCollector(snap))
    m = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            m[(s.name, frozenset(s.labels.items()))] = s.value
    assert value(m, "trifecta_worker_gpu_memory_bytes", worker="sam3-gpu1", device="cuda:1") == 4536.5e6
    assert not [k for k in m if k[0] == "trifecta_worker_gpu_memory_bytes" and dict(k[1])["worker"] == "tm-0"]
    assert value(m, "trifecta_cache_hits_total", worker="sam3-gpu1", cache="feature_cache") == 7
    assert value(m, "trifecta_cache_misses_total", worker="sam3-gpu1", cache="feature_cache") == 2
    assert value(m, "trifecta_active_sessions", model="sam3") == 2 and value(m, "trifecta_active_sessions", model="textmask") == 0
    assert value(m, "trifecta_worker_dropped_expired_total", worker="sam3-gpu1") == 3
    assert value(m, "trifecta_batch_size_bucket", worker="sam3-gpu1", le="2.0") == 5 and value(m, "trifecta_batch_size_sum", worker="sam3-gpu1") == 8
    assert value(m, "trifecta_queue_depth", queue="sam3") == 4 and value(m, "trifecta_webhooks_pending", state="queued") == 2
    assert value(m, "trifecta_worker_batches_total", worker="sam3-gpu1") == 4
    assert list(_worker_metrics([]))  # families are always declared, even with no worker
