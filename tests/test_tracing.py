"""OpenTelemetry tracing (tasks/tracing.py, workers/tracing.py): one trace per request, from a
caller's `traceparent` through the API's server span and the Celery message headers to the
worker's decode, model, encode and storage spans; off by default, and then nothing is traced.

The stack writes its spans with OTEL_TRACES_EXPORTER=console (one JSON object per line on each
process's stdout, which the test stack keeps in its log files); the test reads them back.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from storage import codecs
from tasks.tracing import exporter_names
from tasks.wire import decode_message
from tests.conftest import ROOT, photo, png_bytes

PNG = {"content-type": "image/png"}
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACED = {
    "OTEL_TRACES_EXPORTER": "console",
    "OTEL_BSP_SCHEDULE_DELAY": "50",  # the SDK's own batch processor setting: spans reach the log quickly
    "LOG_FORMAT": "json",
    "MAX_CONCURRENCY_PER_GPU": "1",  # one batch at a time: queued requests wait in Redis, then one batch drains them
    "BATCH_TIMEOUT_MS": "4",
}
# Celery's own header keys (tests/test_wire.py compares our envelope with send_task's)
CELERY_HEADERS = {
    "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries", "timelimit", "root_id", "parent_id",
    "argsrepr", "kwargsrepr", "origin", "ignore_result", "replaced_task_nesting", "stamped_headers", "stamps",
}  # fmt: skip


def _json_lines(path: Path) -> list[dict]:
    """A process's output lines that are JSON objects, whole lines only (it may be writing the last one)."""
    text = path.read_text(errors="replace")
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.startswith("{")]


def _spans(path: Path) -> list[dict]:
    """The console exporter's spans among a process's output lines (its log lines are JSON too)."""
    out = []
    for rec in _json_lines(path):
        if {"name", "context", "kind", "parent_id", "links", "resource"} <= rec.keys():
            out.append(rec)
    return out


def _wait_spans(path: Path, want: int, match: dict, name: str | None = None, timeout: float = 20) -> list[dict]:
    """Spans of `path` (named `name`) whose attributes include `match`, once there are `want` of them."""
    t_end = time.time() + timeout
    while True:
        got = [s for s in _spans(path) if match.items() <= (s.get("attributes") or {}).items() and name in (None, s["name"])]
        if len(got) >= want or time.time() > t_end:
            return got
        time.sleep(0.1)


def _tid(s: dict) -> str:
    return s["context"]["trace_id"].removeprefix("0x")


def _sid(s: dict) -> str:
    return s["context"]["span_id"].removeprefix("0x")


def _parent(s: dict) -> str | None:
    return s["parent_id"].removeprefix("0x") if s["parent_id"] else None


def _t(s: dict, k: str) -> str:
    return s[k]  # ISO 8601 with microseconds in UTC: compares in time order as strings


def _worker_trace(spans: list[dict], process: dict) -> dict[str, dict]:
    """The children of one request's `process` span, by name (each exactly once)."""
    kids = [s for s in spans if _parent(s) == _sid(process)]
    names = [s["name"] for s in kids]
    assert sorted(names) == sorted(set(names)), names
    return {s["name"]: s for s in kids}


@pytest.fixture(scope="module")
def traced(make_stack):  # noqa: ANN001, ANN201
    return make_stack(models=["textmask", "echo"], env=TRACED)


def test_one_trace_from_caller_through_api_queue_and_worker(traced) -> None:  # noqa: ANN001
    st = traced
    api_log = st.api.log
    worker_log = next(w.log for w in st.workers if w.name.startswith("textmask"))
    img = photo("text.png")
    r = httpx.post(f"{st.url}/run_textmask?format=png", content=png_bytes(img), headers={**PNG, "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}, timeout=60)
    assert r.status_code == 200, r.text
    mask = codecs.decode(r.content, "png")
    assert mask.shape == (img.size[1], img.size[0]) and mask.any()  # a real answer, traced
    job = r.headers["X-Job-Id"]

    # the API: FastAPI's server span, a child of the caller's span, in the caller's trace
    servers = [s for s in _wait_spans(api_log, 1, {"http.route": "/run_textmask"}) if s["kind"] == "SpanKind.SERVER"]
    assert len(servers) == 1, servers
    server = servers[0]
    assert server["name"] == "POST /run_textmask"
    assert (_tid(server), _parent(server)) == (CALLER_TRACE, CALLER_SPAN)
    assert server["attributes"]["http.response.status_code"] == 200
    assert server["resource"]["attributes"]["service.name"] == "trifecta-api"

    # the worker: queue and process spans children of the API's span; decode, model, encode, storage of process
    (process,) = _wait_spans(worker_log, 1, {"trifecta.job_id": job, "trifecta.status": "succeeded"}, "process textmask")
    wspans = _spans(worker_log)
    (queued,) = [s for s in wspans if s["name"] == "queue textmask" and s["attributes"]["trifecta.job_id"] == job]
    assert process["name"] == "process textmask" and process["kind"] == "SpanKind.CONSUMER"
    for s in (process, queued):
        assert (_tid(s), _parent(s)) == (CALLER_TRACE, _sid(server)), s
    assert _t(queued, "end_time") <= _t(process, "start_time")
    assert process["resource"]["attributes"]["service.name"] == "trifecta-worker"
    assert process["resource"]["attributes"]["service.instance.id"] == st.workers[0].name
    kids = _worker_trace(wspans, process)
    assert set(kids) == {"decode", "model", "encode", "storage"}, kids
    for name in ("decode", "model", "encode", "storage"):
        assert _tid(kids[name]) == CALLER_TRACE and kids[name]["status"]["status_code"] == "UNSET", kids[name]
    assert _t(kids["decode"], "end_time") <= _t(kids["model"], "start_time") <= _t(kids["model"], "end_time") <= _t(kids["encode"], "start_time") <= _t(kids["storage"], "start_time")
    assert kids["storage"]["attributes"] == {"trifecta.outputs": 1, "trifecta.bytes": len(r.content)}  # the mask the API answered
    assert _t(server, "start_time") <= _t(queued, "start_time")  # enqueued by the API inside its span (one clock)

    # the batch: a trace of its own, linked to the request's process span; its model call is the one the request's model span links to
    batches = [s for s in wspans if s["name"] == "batch textmask" and any(link["context"]["span_id"] == process["context"]["span_id"] for link in s["links"])]
    assert len(batches) == 1, batches
    batch = batches[0]
    assert _tid(batch) != CALLER_TRACE and batch["parent_id"] is None
    (batch_model,) = [s for s in wspans if _parent(s) == _sid(batch)]
    assert batch_model["name"] == "model"
    assert [link["context"]["span_id"] for link in kids["model"]["links"]] == [batch_model["context"]["span_id"]]
    assert (_t(kids["model"], "start_time"), _t(kids["model"], "end_time")) == (_t(batch_model, "start_time"), _t(batch_model, "end_time"))

    # the worker's JSON log line for the job names the caller's trace
    lines = [rec for rec in _json_lines(worker_log) if rec.get("job_id") == job]
    assert any(rec.get("status") == "succeeded" and rec.get("trace_id") == CALLER_TRACE for rec in lines), lines


def test_a_job_is_traced_as_a_sync_call(traced) -> None:  # noqa: ANN001
    """POST /v1/jobs: the worker's spans sit under the API's server span of the submitting call
    (through FastAPI's own operation spans), in the caller's trace."""
    st = traced
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    body = {"model": "textmask", "input": {"image": base64.b64encode(png_bytes(photo("text.png"))).decode()}}
    r = httpx.post(f"{st.url}/v1/jobs", json=body, headers={"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"}, timeout=30)
    assert r.status_code == 202, r.text
    job = r.json()["job_id"]
    worker_log = next(w.log for w in st.workers if w.name.startswith("textmask"))
    (process,) = _wait_spans(worker_log, 1, {"trifecta.job_id": job, "trifecta.status": "succeeded"}, "process textmask", timeout=60)
    assert _tid(process) == trace_id and process["attributes"]["trifecta.kind"] == "job"
    assert set(_worker_trace(_spans(worker_log), process)) == {"decode", "model", "encode", "storage"}
    t_end = time.time() + 20
    while not any(s["name"] == "POST /v1/jobs" and _tid(s) == trace_id for s in _spans(st.api.log)):  # the server span ends (and is exported) last
        assert time.time() < t_end
        time.sleep(0.1)
    api = {_sid(s): s for s in _spans(st.api.log) if _tid(s) == trace_id}
    chain, sid = [], _parent(process)
    while sid in api:  # up from the process span's parent to the caller
        chain.append(api[sid])
        sid = _parent(api[sid])
    assert sid == "b7ad6b7169203331" and chain[-1]["name"] == "POST /v1/jobs" and chain[-1]["kind"] == "SpanKind.SERVER", [c["name"] for c in chain]
    assert chain[-1]["attributes"]["http.response.status_code"] == 202


def test_drained_requests_keep_their_own_traces(traced) -> None:  # noqa: ANN001
    """Requests queued behind a busy worker reach one batch, one by kombu's delivery and the rest by
    the bulk drain (tasks/wire.py DRAIN_LUA): each keeps its caller's trace, and the batch span links them all."""
    st = traced
    worker_log = next(w.log for w in st.workers if w.name.startswith("echo"))
    body = {"model": "echo", "input": {"image": base64.b64encode(b"blocker").decode()}, "params": {"sleep_ms": 4000}}
    r = httpx.post(f"{st.url}/v1/jobs", json=body, timeout=10)
    assert r.status_code == 202, r.text
    blocker = r.json()["job_id"]
    t_end = time.time() + 20
    while httpx.get(f"{st.url}/v1/jobs/{blocker}", timeout=10).json()["status"] != "running":
        assert time.time() < t_end
        time.sleep(0.05)
    traces = [f"{i + 1:032x}" for i in range(4)]
    answers: dict[str, httpx.Response] = {}

    def call(tid: str) -> None:
        answers[tid] = httpx.post(f"{st.url}/run_echo", content=tid.encode(), headers={**PNG, "traceparent": f"00-{tid}-{CALLER_SPAN}-01"}, timeout=30)

    threads = [threading.Thread(target=call, args=(t,)) for t in traces]
    for t in threads:
        t.start()
    while st.redis.llen("echo") < 4:  # all four wait in the queue while the blocker runs
        assert time.time() < t_end
        time.sleep(0.02)
    # on the wire: Celery's headers plus the W3C context of the API's server span, in the caller's trace
    queued = [decode_message(m)[0] for m in st.redis.lrange("echo", 0, -1)]
    assert httpx.get(f"{st.url}/v1/jobs/{blocker}", timeout=10).json()["status"] == "running"
    for h in queued:
        assert set(h) == CELERY_HEADERS | {"traceparent"}, set(h) ^ CELERY_HEADERS
        version, tid, span_id, flags = h["traceparent"].split("-")
        assert (version, flags) == ("00", "01") and tid in traces and span_id != CALLER_SPAN
    assert sorted(h["traceparent"].split("-")[1] for h in queued) == traces
    for t in threads:
        t.join(30)
    assert sorted(answers) == traces and all(a.status_code == 200 for a in answers.values()), {k: (a.status_code, a.text) for k, a in answers.items()}
    jobs = {tid: a.json()["job_id"] for tid, a in answers.items()}

    procs = {tid: _wait_spans(worker_log, 1, {"trifecta.job_id": job}, "process echo") for tid, job in jobs.items()}
    wspans = _spans(worker_log)
    for tid, (p,) in procs.items():
        assert _tid(p) == tid and p["name"] == "process echo"
        want_parent = next(h["traceparent"].split("-")[2] for h in queued if h["traceparent"].split("-")[1] == tid)
        assert _parent(p) == want_parent  # the API's span the message carried
        assert set(_worker_trace(wspans, p)) == {"decode", "model", "encode", "storage"}
    # one batch took all four (kombu delivered one, the drain brought the others), linked to each
    batch = [s for s in wspans if s["name"] == "batch echo" and s["attributes"]["trifecta.batch_size"] == 4]
    assert len(batch) == 1, [(s["name"], s["attributes"]) for s in wspans if s["name"] == "batch echo"]
    assert sorted(link["context"]["span_id"] for link in batch[0]["links"]) == sorted(p["context"]["span_id"] for (p,) in procs.values())


def test_off_by_default_no_spans_and_no_sdk(make_stack) -> None:  # noqa: ANN001
    st = make_stack(models=["echo"], env={"MAX_BATCH_SIZE": "1"})
    r = httpx.post(f"{st.url}/run_echo", content=b"untraced", headers={**PNG, "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}, timeout=30)
    assert r.status_code == 200 and r.json()["bytes"] == 8
    job = r.json()["job_id"]
    worker_log = st.workers[0].log
    t_end = time.time() + 10
    while job not in worker_log.read_text():  # the worker's line for the job is written after its reply
        assert time.time() < t_end
        time.sleep(0.1)
    assert _spans(st.api.log) == [] and _spans(worker_log) == []
    # and no tracer provider, no SDK tracing and no exporter is loaded in the API process (create_app)
    # or by a worker's service module. (FastAPI imports the OpenTelemetry API itself, and redis-py
    # the SDK's metrics module where the SDK is installed: neither records anything unless set up.)
    probe = (
        "import sys; from opentelemetry import trace; from api.app import create_app; import workers.service; from tasks import tracing, wire; create_app();"
        "h = wire.decode_message(wire.build_message('t', 'i', {}, 'q'))[0];"
        "print(tracing.ON, type(trace.get_tracer_provider()).__name__, sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk.trace', 'opentelemetry.exporter'))), 'traceparent' in h)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", probe], env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == "False ProxyTracerProvider [] False"


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({}, []),
        ({"OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": " OTLP , console"}, ["otlp", "console"]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"]),  # an endpoint alone: the spec's default exporter
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, []),
    ],
)
def test_exporter_names_from_the_environment(env: dict[str, str], want: list[str]) -> None:
    assert exporter_names(env) == want


def test_unknown_exporter_refuses_to_start() -> None:
    """A misspelt exporter stops the process with a message, before it serves anything untraced."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}, "OTEL_TRACES_EXPORTER": "jaegr", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", "from tasks import tracing; tracing.setup('x')"], env=env, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 1 and "'jaegr', which is not installed" in out.stderr, out.stderr




def test_otlp_export_to_a_collector_from_the_environment() -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT alone turns tracing on with the OTLP/HTTP exporter; the SDK reads the
    endpoint, headers and service name from the environment. A receiver stands in for the collector."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    got: list[tuple[str, dict[str, str], bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            got.append((self.path, {k.lower(): v for k, v in self.headers.items()}, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update({"PYTHONPATH": str(ROOT), "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{srv.server_port}", "OTEL_EXPORTER_OTLP_HEADERS": "x-token=s3cret", "OTEL_SERVICE_NAME": "edge-api"})
        code = "from tasks import tracing; assert tracing.setup(tracing.SERVICE_API); tracing.tracer().start_span('hello', attributes={'n': 3}).end()"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, timeout=60)  # exits: the SDK flushes its batch
        assert out.returncode == 0, out.stderr
    finally:
        srv.shutdown()
    assert len(got) == 1, got
    path, headers, body = got[0]
    assert path == "/v1/traces" and headers["x-token"] == "s3cret" and headers["content-type"] == "application/x-protobuf"
    req = ExportTraceServiceRequest.FromString(body)
    (rs,) = req.resource_spans
    assert {a.key: a.value.string_value for a in rs.resource.attributes}["service.name"] == "edge-api"
    (span,) = [s for ss in rs.scope_spans for s in ss.spans]
    assert span.name == "hello" and [(a.key, a.value.int_value) for a in span.attributes] == [("n", 3)]
    assert rs.scope_spans[0].scope.name == "trifecta"
