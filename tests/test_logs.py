"""LOG_FORMAT=json: every line the API and a worker write is one JSON object, and a job's
state changes can be found by its id, with its model, tenant and worker as fields."""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tasks.embedded_redis import free_port
from tests.conftest import photo, png_bytes

KEY = "log-test-key-0123456789abcdef"


def _records(path: Path) -> list[dict]:
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        try:
            rec = json.loads(line)
        except ValueError:
            pytest.fail(f"{path.name} line {i + 1} is not JSON: {line[:300]!r}")
        assert isinstance(rec, dict), line
        assert {"time", "level", "logger", "message"} <= rec.keys(), rec
        out.append(rec)
    return out


def _wait_for(path: Path, job_id: str, status: str, timeout: float = 10) -> list[dict]:
    """The worker writes its line right after recording the result: wait for it to reach the file."""
    t_end = time.time() + timeout
    while time.time() < t_end:
        recs = [r for r in _records(path) if r.get("job_id") == job_id]
        if any(r.get("status") == status for r in recs):
            return recs
        time.sleep(0.1)
    raise AssertionError(f"no {status} line for {job_id} in {path.name}")


def test_json_logs_of_api_and_worker(make_stack) -> None:  # noqa: ANN001
    st = make_stack(models=["textmask"], env={"LOG_FORMAT": "json", "API_KEYS": f"{KEY}:acme"})
    api_log, worker_log = st.api.log, st.workers[0].log
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "textmask", "input": {"image": base64.b64encode(png_bytes(photo("text.png"))).decode()}}
    r = httpx.post(f"{st.url}/v1/jobs", json=body, headers=h, timeout=30)
    assert r.status_code == 202, r.text
    jid = r.json()["job_id"]
    t_end = time.time() + 60
    while (j := httpx.get(f"{st.url}/v1/jobs/{jid}", headers=h, timeout=10).json())["status"] != "succeeded":
        assert j["status"] in ("queued", "running") and time.time() < t_end, j
        time.sleep(0.1)
    # a bad request (401) and an unknown route still leave only JSON lines behind
    assert httpx.post(f"{st.url}/v1/jobs", json=body, timeout=10).status_code == 401
    assert httpx.get(f"{st.url}/no/such", headers=h, timeout=10).status_code == 404

    wrecs = _wait_for(worker_log, jid, "succeeded")
    done = [x for x in wrecs if x.get("status") == "succeeded"]
    assert len(done) == 1, wrecs
    d = done[0]
    assert (d["level"], d["logger"], d["model"], d["tenant"], d["worker"], d["device"]) == ("INFO", "trifecta.worker", "textmask", "acme", st.workers[0].name, "cpu")
    assert d["kind"] == "job" and d["batch_size"] >= 1 and d["model_ms"] > 0 and d["queue_ms"] >= 0
    assert jid in d["message"]
    # every worker line carries the worker's identity, also lines that name no job (startup, Celery's own)
    all_w = _records(worker_log)
    assert any("ready" in x["message"] for x in all_w)
    assert all(x.get("worker") == st.workers[0].name and x.get("model") == "textmask" for x in all_w), [x for x in all_w if x.get("worker") != st.workers[0].name][:3]

    arecs = _records(api_log)
    queued = [x for x in arecs if x.get("job_id") == jid]
    assert [(x["status"], x["model"], x["tenant"], x["kind"], x["level"]) for x in queued] == [("queued", "textmask", "acme", "job", "INFO")], queued
    assert any(x["logger"].startswith("uvicorn") for x in arecs)  # the server's own lines are JSON too
    # times are ISO 8601 and in order of writing
    ts = [x["time"] for x in arecs]
    assert all("T" in t for t in ts) and ts == sorted(ts)

    # a cancel is a state change the API logs as well
    r = httpx.delete(f"{st.url}/v1/jobs/{jid}", headers=h, timeout=10)
    assert r.status_code in (200, 409), r.text
    t_end = time.time() + 5
    while not [x for x in _records(api_log) if x.get("job_id") == jid and "cancel" in x["message"]]:
        assert time.time() < t_end, "no cancel line"
        time.sleep(0.1)
    assert httpx.get(f"{st.url}/health", timeout=10).status_code == 200
    # shutting down (SIGTERM) writes JSON lines too
    st.workers[0].stop()
    st.api.stop()
    assert any("shutdown" in x["message"].lower() for x in _records(worker_log))
    assert any(x["message"] == "Shutting down" for x in _records(api_log))  # uvicorn's line at SIGTERM


def test_context_fields_reach_the_json_line() -> None:
    from tasks import logs

    rec = logging.LogRecord("trifecta.x", logging.INFO, __file__, 1, "job=%s model=%s done", ("ab" * 16, "textmask"), None)
    with logs.log_context(tenant="t1"):
        logs.ContextFilter().filter(rec)
    out = json.loads(logs.json_formatter().format(rec))
    assert (out["job_id"], out["model"], out["tenant"], out["level"], out["logger"], out["message"]) == ("ab" * 16, "textmask", "t1", "INFO", "trifecta.x", f"job={'ab' * 16} model=textmask done")
    # a field the line passes itself wins over one lifted from the message
    rec2 = logging.LogRecord("trifecta.x", logging.INFO, __file__, 1, "job=%s", ("cd" * 16,), None)
    rec2.job_id = "given"
    logs.ContextFilter().filter(rec2)
    assert json.loads(logs.json_formatter().format(rec2))["job_id"] == "given"
    # an exception's traceback stays inside its one line
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        import sys

        rec3 = logging.LogRecord("trifecta.x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = logs.json_formatter().format(rec3)
    assert "\n" not in line and "ValueError" in json.loads(line)["exc_info"]


def test_trifecta_up_writes_only_json_lines(tmp_path: Path, model_dir: Path) -> None:
    """`trifecta up` with LOG_FORMAT=json: the supervisor's own lines (its banner too), the API's
    and the worker's all land in one output, and each line is one JSON object."""
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "RUN_DIR": str(tmp_path / "run"),
        "MODELS": "echo",
        "LOG_FORMAT": "json",
        "MODEL_DIR": str(model_dir),
        "STORAGE_URL": f"file://{tmp_path / 'data'}",
        "WORKER_HEARTBEAT_S": "1",
    }
    out = tmp_path / "up.log"
    up = subprocess.Popen([sys.executable, "-m", "client.cli", "up", "--port", str(port), "--no-flower"], env=env, stdout=open(out, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t_end = time.time() + 90
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).json().get("ready"):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            assert up.poll() is None and time.time() < t_end, out.read_text()[-3000:]
            time.sleep(0.3)
        r = httpx.post(url + "/v1/jobs", json={"model": "echo", "input": {"image": base64.b64encode(b"hello").decode()}}, timeout=30)
        assert r.status_code == 202, r.text
        jid = r.json()["job_id"]
        recs = _wait_for(out, jid, "succeeded", timeout=30)
        assert {(x["logger"], x["status"]) for x in recs} == {("trifecta.api", "queued"), ("trifecta.worker", "succeeded")}, recs
        assert [x for x in recs if x["status"] == "succeeded"][0]["worker"].startswith("echo-cpu-")
    finally:
        os.killpg(up.pid, signal.SIGINT)
        up.wait(30)
    recs = _records(out)  # after shutdown as well: no line of any process was plain text
    banner = [x for x in recs if x["logger"] == "trifecta.up" and x["message"].startswith("Trifecta is starting")]
    assert len(banner) == 1 and banner[0]["api_url"] == url and banner[0]["workers"] == ["echo@cpu"]
    assert any(x["logger"] == "trifecta.up" and x["message"].startswith("models ready") for x in recs)
    assert any(x["logger"].startswith("uvicorn") and x["message"] == "Shutting down" for x in recs)
