"""`trifecta bench`: every figure a ratio to a baseline measured in the same run.

Sections (run all, or pick with --only):
  textmask   four real inputs (451x300 PNG ... 2048x1536 JPEG), concurrency 8 and 16, the service
             on its DEFAULT settings against a default `onnxruntime.InferenceSession` (raw) and
             RapidOCR's own TextDetector script (naive), plus CPU per image (client/bench_textmask.py)
  simulated  images/s one worker feeds a simulated device (the `simulated` model), as a share of
             the device's own maximum at batch 16, and the pipeline's CPU per image
  dispatch   echo HTTP round trip vs a bare Celery `apply_async().get()`; echo req/s at
             concurrency 64 vs the plain solo worker's no-op tasks/s
  reject     503 latency with the queue full vs a constant-answer endpoint (/ping)
  batching   pipeline gain of MAX_BATCH_SIZE=8 over 1 vs a default ORT session's batch-8/batch-1 gain
  memory     API RSS and heavy imports, 1,000 waiting requests, worker RSS over 10,000 requests
  codecs     packbits encode+decode + image decode/preprocess of a 2048 px JPEG vs one default-session call on it
  events     the echo worker's CPU per request and req/s with TASK_EVENTS on (Flower's counts) vs off
  shards, sam3, sam3video, models   sections added by the model issues (client/bench_*.py)
  s3sync     sync textmask p50 on s3:// (moto server) / file:// in one run, alternated, and the
             storage requests per sync call on s3 (client/bench_s3sync.py)
  redisops   Redis round trips (client read events) and commands per sync echo request, counted
             by Redis, against the figures before this round's refactors (client/bench_redisops.py)
  state      Redis bytes/keys and storage bytes/objects each kind of request leaves behind,
             right after and once its lifetime passed; capacity at 10-1000 req/s (bench_state.py)

The load generator runs in this process on the same machine (its CPU counts against the
service); it is a lean asyncio HTTP/1.1 loop (client/loadgen.py).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from client import loadgen
from client.benchkit import Proc, Stack
from client.cpuacct import CpuMeter
from tasks.embedded_redis import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]
PNG = {"Content-Type": "image/png"}


def row(goal: str, figure: float, target: float, higher_is_better: bool = True, unit: str = "x", **details: Any) -> dict[str, Any]:
    ok = figure >= target if higher_is_better else figure <= target
    return {"goal": goal, "figure": round(float(figure), 3), "target": target, "higher_is_better": higher_is_better, "pass": bool(ok), "unit": unit, "details": details}


def text_image(size: tuple[int, int] | None = None) -> bytes:
    from PIL import Image, ImageDraw, ImageFont

    imgs = ROOT / "tests" / "data" / "images"
    im = Image.open(imgs / "chelsea.png").convert("RGB")
    if size:
        im = im.resize(size)
    d = ImageDraw.Draw(im)
    d.text((20, 20), "HELLO WORLD 42", fill=(255, 255, 255), font=ImageFont.load_default(size=max(24, im.size[0] // 14)))
    bio = io.BytesIO()
    im.save(bio, format="PNG")
    return bio.getvalue()


def cores() -> int:
    return len(os.sched_getaffinity(0))


class Env:
    """One embedded Redis for the whole run; a fresh Redis database per stack."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="trifecta-bench-"))
        self.redis = EmbeddedRedis(self.tmp / "redis", appendonly=False).start()
        self.db = 0
        self.stacks: list[Stack] = []

    def stack(self, models: list[str], env: dict[str, str] | None = None, defaults: bool = False) -> Stack:
        """A stack on its own Redis database. defaults=True: every Trifecta setting of this
        environment is removed first (the service as shipped; only `env` is set on top)."""
        self.db = self.db % 14 + 1
        st = Stack.create(f"redis://127.0.0.1:{self.redis.port}/{self.db}", self.tmp / f"stack{len(self.stacks)}")
        if defaults:
            strip_settings(st.env)
        st.env.update(env or {})
        self.stacks.append(st)
        for i, m in enumerate(models):
            st.start_worker(m, f"{m}-{i}")
        st.start_api()
        for m in set(models):
            st.wait_live(m, models.count(m))
        return st

    def close(self) -> None:
        for st in self.stacks:
            st.stop()
        self.redis.stop()


PLUMBING = {"REDIS_URL", "STORAGE_URL", "MODEL_DIR"}  # where the stack's parts are, not how they behave


def strip_settings(env: dict[str, str]) -> dict[str, str]:
    """Remove every Trifecta setting (tasks/settings.py field) from env but the stack's plumbing."""
    from tasks.settings import Settings

    for k in [k for k in env if k.lower() in Settings.model_fields and k.upper() not in PLUMBING]:
        del env[k]
    return env


def load(url: str, path: str, body: bytes, concurrency: int, total: int | None = None, duration: float | None = None, method: str = "POST", ok: tuple[int, ...] = (200,), headers: dict[str, str] | None = None) -> loadgen.Result:
    return asyncio.run(loadgen.run(url, method, path, body, headers or PNG, concurrency, total=total, duration=duration, ok=ok))


_median = statistics.median


def default_session() -> tuple[Any, str]:
    """ONNX Runtime's defaults, as a user would open the model: no session options at all."""
    import onnxruntime as ort

    from client.bench_textmask import model_path

    sess = ort.InferenceSession(model_path())
    return sess, sess.get_inputs()[0].name


def raw_rate(sess: Any, name: str, x: np.ndarray, batch: int, seconds: float) -> tuple[float, float]:
    """(images/s, seconds per call) of a session's run on a prepared 1 x C x H x W tensor, stacked to `batch`."""
    xb = np.concatenate([x] * batch)
    sess.run(None, {name: xb})
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        sess.run(None, {name: xb})
        n += 1
    dt = time.perf_counter() - t0
    return n * batch / dt, dt / n


# ------------------------------------------------------------------ dispatch
def sec_dispatch(env: Env, quick: bool, out: dict[str, Any]) -> list[dict[str, Any]]:
    """Both sides up at once, measured in alternating blocks (bare, ours, bare, ...), so a
    shared host's load that comes and goes weighs on both alike; both workers idle (blocked
    in BRPOP) while the other side runs."""
    bst = Stack.create(f"redis://127.0.0.1:{env.redis.port}/15", env.tmp / "bare")
    w = Proc("bare", [sys.executable, "-m", "celery", "-A", "client.bench_celery", "worker", "-P", "solo", "-Q", "bare", "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING"], bst.env, env.tmp / "bare.log").start()
    os.environ["REDIS_URL"] = bst.env["REDIS_URL"]
    bc = importlib.reload(importlib.import_module("client.bench_celery"))
    # default settings; MAX_QUEUE_DEPTH raised only so that admission never refuses the c=64 load
    st = env.stack(["echo"], {"MAX_QUEUE_DEPTH": "100000"}, defaults=True)
    tuned = env.stack(["echo"], {**TUNED_ECHO, "MAX_QUEUE_DEPTH": "100000"}, defaults=True)
    body = b"x" * 64
    rounds, block = (2, 150) if quick else (5, 400)
    bare_lat: list[float] = []
    ours_lat: list[float] = []
    bare_rate: list[float] = []
    ours_rate: list[float] = []
    tuned_rate: list[float] = []
    statuses: dict[int, int] = {}
    try:
        bc.noop.apply_async(queue="bare").get(timeout=60)
        load(st.url, "/run_echo", body, 8, total=200)  # warm
        load(tuned.url, "/run_echo", body, 8, total=200)
        for _ in range(rounds):
            for _ in range(block):
                t0 = time.perf_counter()
                bc.noop.apply_async(queue="bare").get(timeout=30)
                bare_lat.append(time.perf_counter() - t0)
            ours_lat += load(st.url, "/run_echo", body, 1, total=block).latencies
        for _ in range(2 if quick else 3):
            m = 600 if quick else 1500
            t0 = time.perf_counter()
            rs = [bc.noop.apply_async(queue="bare") for _ in range(m)]
            for r in rs:
                r.get(timeout=120)
            bare_rate.append(m / (time.perf_counter() - t0))
            del rs, r
            c64 = load(st.url, "/run_echo", body, 64, duration=3 if quick else 5)
            ours_rate.append(c64.rate())
            for k, v in c64.statuses.items():
                statuses[k] = statuses.get(k, 0) + v
            tuned_rate.append(load(tuned.url, "/run_echo", body, 64, duration=3 if quick else 5).rate())
        gc.collect()  # celery's AsyncResults unsubscribe in __del__: while Redis is still up
    finally:
        w.stop()
        st.stop()
        tuned.stop()

    def pct(xs: list[float], p: float) -> float:
        return loadgen.Result(latencies=xs).pct(p) * 1000

    bare = {"p50_ms": pct(bare_lat, 50), "p99_ms": pct(bare_lat, 99), "tasks_per_s": _median(bare_rate), "rounds_tasks_per_s": bare_rate}
    ours = {"p50_ms": pct(ours_lat, 50), "p99_ms": pct(ours_lat, 99), "rps_c64": _median(ours_rate), "rounds_rps_c64": ours_rate, "statuses_c64": statuses}
    ours["tuned_rps_c64"] = _median(tuned_rate)
    ours["tuned_rounds_rps_c64"] = tuned_rate
    out["dispatch"] = {"bare_celery": bare, "trifecta_echo": ours, "tuned_settings": TUNED_ECHO, "rounds": rounds, "block": block}
    return [
        row("echo HTTP round trip p50 / bare Celery apply_async().get() p50", ours["p50_ms"] / bare["p50_ms"], 1.0, higher_is_better=False, ours_ms=ours["p50_ms"], bare_ms=bare["p50_ms"]),
        row("echo HTTP round trip p99 / bare Celery p99", ours["p99_ms"] / bare["p99_ms"], 1.0, higher_is_better=False, ours_ms=ours["p99_ms"], bare_ms=bare["p99_ms"]),
        row("echo req/s at concurrency 64 / plain solo worker no-op tasks/s", ours["rps_c64"] / bare["tasks_per_s"], 1.5, ours=ours["rps_c64"], bare=bare["tasks_per_s"]),
        row(f"tuned ({', '.join(f'{k}={v}' for k, v in TUNED_ECHO.items())}): echo req/s at c=64 / solo worker tasks/s, reported", ours["tuned_rps_c64"] / bare["tasks_per_s"], 1e9, higher_is_better=False, ours=ours["tuned_rps_c64"], bare=bare["tasks_per_s"]),
    ]


TUNED_ECHO = {"MAX_BATCH_SIZE": "64", "BATCH_TIMEOUT_MS": "0", "MAX_CONCURRENCY_PER_GPU": "1"}  # a no-op model: big batches, no wait


# ------------------------------------------------------------------ rejection
def sec_reject(env: Env, quick: bool, out: dict[str, Any]) -> list[dict[str, Any]]:
    st = env.stack(["echo"], {"MAX_QUEUE_DEPTH": "2", "MAX_BATCH_SIZE": "1", "MAX_CONCURRENCY_PER_GPU": "1"}, defaults=True)  # the scenario: a queue that fills at once

    async def measure() -> dict[str, Any]:
        import httpx

        async with httpx.AsyncClient(timeout=120) as c:
            hold = [asyncio.create_task(c.post(st.url + "/run_echo?sleep_ms=60000&timeout=90", content=b"x", headers=PNG)) for _ in range(6)]
            await asyncio.sleep(1.5)
            n = 300 if quick else 2000
            a = await loadgen.run(st.url, "POST", "/run_echo", b"x", PNG, 1, total=n, ok=(503,))
            p = await loadgen.run(st.url, "GET", "/ping", b"", {}, 1, total=n)
            b = await loadgen.run(st.url, "POST", "/run_echo", b"x", PNG, 1, total=n, ok=(503,))
            q = await loadgen.run(st.url, "GET", "/ping", b"", {}, 1, total=n)
            for t in hold:
                t.cancel()
            return {"p50_503_ms": statistics.median(a.latencies + b.latencies) * 1000, "p50_ping_ms": statistics.median(p.latencies + q.latencies) * 1000, "statuses": a.statuses}

    r = asyncio.run(measure())
    st.stop()
    out["reject"] = r
    return [row("503 p50 latency (queue full) / constant endpoint p50", r["p50_503_ms"] / r["p50_ping_ms"], 1.5, higher_is_better=False, p50_503_ms=r["p50_503_ms"], p50_ping_ms=r["p50_ping_ms"])]


# ------------------------------------------------------------------ batching
def sec_batching(env: Env, quick: bool, out: dict[str, Any]) -> list[dict[str, Any]]:
    from client.bench_textmask import prepare_tensor, service_runner

    img = text_image()
    x = prepare_tensor(service_runner(cores()), img)
    sess, name = default_session()
    secs = 4 if quick else 6
    rounds = 2 if quick else 3
    stacks = {b: env.stack(["textmask"], {"MAX_BATCH_SIZE": str(b), "BATCH_TIMEOUT_MS": "10"}, defaults=True) for b in (1, 8)}
    for st in stacks.values():
        load(st.url, "/run_textmask", img, 4, total=8)
    raw: dict[int, list[float]] = {1: [], 8: []}
    pipe: dict[int, list[float]] = {1: [], 8: []}
    for _ in range(rounds):  # alternated, so the host's load weighs on all four alike; idle workers use no CPU
        for b in (1, 8):
            raw[b].append(raw_rate(sess, name, x, b, secs)[0])
            pipe[b].append(load(stacks[b].url, "/run_textmask", img, 16, duration=secs).rate())
    for st in stacks.values():
        st.stop()
    r1, r8, p1, p8 = _median(raw[1]), _median(raw[8]), _median(pipe[1]), _median(pipe[8])
    raw_gain, pipe_gain = r8 / r1, p8 / p1
    out["batching"] = {"raw_b1": r1, "raw_b8": r8, "pipe_b1": p1, "pipe_b8": p8, "raw_gain": raw_gain, "pipe_gain": pipe_gain, "rounds": {"raw": raw, "pipe": pipe}}
    return [row("textmask batching gain kept: (pipeline b8/b1) / (default ORT session b8/b1)", pipe_gain / raw_gain, 0.9, raw_gain=raw_gain, pipeline_gain=pipe_gain)]


# ------------------------------------------------------------------ memory
def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(ln for ln in f if ln.startswith("Threads:")).split()[1])


def _maps_have(pid: int, names: tuple[str, ...]) -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        text = f.read()
    return [n for n in names if n in text]


def sec_memory(env: Env, quick: bool, out: dict[str, Any]) -> list[dict[str, Any]]:
    # the scenario: 1,000 requests held at once (batches of 256 that each sleep 2 s)
    st = env.stack(["echo"], {"MAX_QUEUE_DEPTH": "5000", "MAX_BATCH_SIZE": "256", "BATCH_TIMEOUT_MS": "0", "MAX_CONCURRENCY_PER_GPU": "1"}, defaults=True)
    api_pid, wpid = st.api.p.pid, st.workers[0].p.pid
    load(st.url, "/run_echo", b"x" * 64, 16, total=1000)
    w0 = _rss_mb(wpid)
    n = 2000 if quick else 10_000
    load(st.url, "/run_echo", b"x" * 64, 32, total=n)
    w1 = _rss_mb(wpid)
    heavy = _maps_have(api_pid, ("libtorch", "onnxruntime", "libcudart"))
    held = 1000

    async def hold() -> tuple[dict[int, int], int, float]:
        peak_threads, peak_rss = 0, 0.0

        async def probe() -> None:
            nonlocal peak_threads, peak_rss
            for _ in range(40):
                peak_threads = max(peak_threads, _threads(api_pid))
                peak_rss = max(peak_rss, _rss_mb(api_pid))
                await asyncio.sleep(0.1)

        pr = asyncio.create_task(probe())
        # each batch (up to 256) holds 2 s, so the last of the 1,000 waits ~8 s: all are held at once
        res = await loadgen.run(st.url, "POST", "/run_echo?sleep_ms=2000", b"x", PNG, held, total=held)
        await pr
        return res.statuses, peak_threads, peak_rss

    statuses, peak_threads, peak_rss = asyncio.run(hold())
    api_rss = _rss_mb(api_pid)
    st.stop()
    growth = (w1 - w0) / w0
    out["memory"] = {"api_rss_mb": api_rss, "api_peak_rss_mb_holding_1000": peak_rss, "api_heavy_libs": heavy, "api_peak_threads": peak_threads, "held_statuses": statuses, "worker_rss_mb_before": w0, "worker_rss_mb_after": w1, "worker_requests": n}
    return [
        row("API RSS (MB) peak, no torch/onnxruntime loaded", max(api_rss, peak_rss) if not heavy else 9999, 150, higher_is_better=False, unit="MB", heavy_libs=heavy),
        row("1,000 concurrent waiting sync requests answered 200 (share)", statuses.get(200, 0) / held, 1.0, unit="share", api_threads_peak=peak_threads, statuses=statuses),
        row(f"worker RSS change over {n} requests", abs(growth) * 100, 5.0, higher_is_better=False, unit="%", before_mb=w0, after_mb=w1),
    ]


# ------------------------------------------------------------------ codecs
def sec_codecs(env: Env, quick: bool, out: dict[str, Any]) -> list[dict[str, Any]]:
    from PIL import Image

    from client.bench_textmask import prepare_tensor, service_runner
    from storage import codecs

    big = Image.open(io.BytesIO(text_image((2048, 2048)))).convert("RGB")
    bio = io.BytesIO()
    big.save(bio, format="JPEG", quality=90)
    jpeg = bio.getvalue()
    r = service_runner(cores())
    sess, name = default_session()
    reps = 3 if quick else 7
    x = prepare_tensor(r, jpeg)
    y = sess.run(None, {name: x})[0]
    mask = y[0, 0] > 0.3
    models, codecs_s, decodes = [], [], []
    for _ in range(reps):  # alternated, medians: a shared host's load weighs on both sides alike
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        models.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(3):
            codecs.decode_packbits(codecs.encode_packbits(mask))
        codecs_s.append((time.perf_counter() - t0) / 3)
        t0 = time.perf_counter()
        for _ in range(3):
            prepare_tensor(r, jpeg)  # the worker's own path: header, JPEG decode, resize, normalise
        decodes.append((time.perf_counter() - t0) / 3)
    model_s, codec_s, decode_s = _median(models), _median(codecs_s), _median(decodes)
    share = (codec_s + decode_s) / model_s * 100
    out["codecs"] = {"input_shape": list(x.shape), "model_ms_2048": model_s * 1000, "packbits_ms": codec_s * 1000, "decode_resize_ms": decode_s * 1000}
    return [row("packbits enc+dec + decode/preprocess, % of one default-session textmask call on a 2048 px JPEG", share, 5.0, higher_is_better=False, unit="%", model_ms=model_s * 1000, packbits_ms=codec_s * 1000, decode_resize_ms=decode_s * 1000)]


# ------------------------------------------------------------------ task events
def sec_events(env: Env, quick: bool, out: dict[str, Any]) -> list[dict[str, Any]]:
    """TASK_EVENTS (on by default, for Flower) against off: two echo stacks up at once, measured in
    alternating blocks; the worker's CPU seconds per request (from /proc) and req/s at concurrency 16."""
    stacks = {flag: env.stack(["echo"], {"TASK_EVENTS": flag, "MAX_QUEUE_DEPTH": "100000"}, defaults=True) for flag in ("false", "true")}
    body = b"x" * 64
    rounds, n = (2, 600) if quick else (4, 2000)
    cpu_us: dict[str, list[float]] = {"false": [], "true": []}
    rate: dict[str, list[float]] = {"false": [], "true": []}
    for st in stacks.values():
        load(st.url, "/run_echo", body, 16, total=200)  # warm
    for _ in range(rounds):
        for flag, st in stacks.items():
            meter = CpuMeter({"worker": st.workers[0].p.pid}).start()  # type: ignore[union-attr]
            res = load(st.url, "/run_echo", body, 16, total=n)
            cpu_us[flag].append(meter.stop()["worker"] / n * 1e6)
            rate[flag].append(res.rate())
    for st in stacks.values():
        st.stop()
    on, off = _median(cpu_us["true"]), _median(cpu_us["false"])
    out["events"] = {"worker_cpu_us_per_request": {"on": cpu_us["true"], "off": cpu_us["false"]}, "rps_c16": {"on": rate["true"], "off": rate["false"]}, "requests_per_block": n}
    return [
        row("echo worker CPU per request, task events on / off", on / off, 1.15, higher_is_better=False, on_us=on, off_us=off),
        row("echo req/s at concurrency 16, task events on / off", _median(rate["true"]) / _median(rate["false"]), 0.9, on=_median(rate["true"]), off=_median(rate["false"])),
    ]


from client.bench_simulated import sec_simulated  # noqa: E402 - sections use the helpers above
from client.bench_textmask import sec_textmask  # noqa: E402

SECTIONS = {"textmask": sec_textmask, "simulated": sec_simulated, "dispatch": sec_dispatch, "reject": sec_reject, "batching": sec_batching, "memory": sec_memory, "codecs": sec_codecs, "events": sec_events}
EXTERNAL = {"torch": "client.bench_torch", "shards": "client.bench_shards", "sam3": "client.bench_sam3", "sam3video": "client.bench_sam3video", "models": "client.bench_models", "state": "client.bench_state", "s3sync": "client.bench_s3sync", "redisops": "client.bench_redisops"}


def plot(out: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed (pip install -e '.[dev]'): no plot at {path}", file=sys.stderr)
        return
    tm = out.get("textmask")
    if not tm or not tm.get("inputs"):
        return
    names = list(tm["inputs"])
    med = [tm["inputs"][n]["median"] for n in names]
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    sides = [("raw", "raw (default ORT session)"), ("naive", "naive (RapidOCR script)"), ("c8", "service c=8"), ("c16", "service c=16")]
    w = 0.2
    for i, (k, label) in enumerate(sides):
        ax[0].bar([j + (i - 1.5) * w for j in range(len(names))], [m.get(k, {}).get("rate", 0) for m in med], w, label=label)
    ax[0].set_xticks(range(len(names)), names, rotation=15)
    ax[0].set(ylabel="images/s", title="textmask throughput (medians of alternated rounds)")
    ax[0].legend(fontsize=8)
    procs = ("worker", "api", "redis")
    bottom = [0.0] * len(names)
    for p in procs:
        v = [m["c16"].get(f"cpu_ms_{p}", 0) for m in med]
        ax[1].bar([j + w / 2 for j in range(len(names))], v, w, bottom=bottom, label=f"service {p}")
        bottom = [b + x for b, x in zip(bottom, v, strict=True)]
    ax[1].bar([j - w / 2 for j in range(len(names))], [m.get("naive", {}).get("cpu_ms", 0) for m in med], w, label="naive script", color="grey")
    ax[1].set_xticks(range(len(names)), names, rotation=15)
    ax[1].set(ylabel="CPU ms per image", title="CPU per image (service at c=16)")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def gpu_name() -> str | None:
    """The first GPU's name from nvidia-smi (no CUDA library loaded), or None."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def main(a: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    only = set(a.only.split(",")) if a.only else None
    if getattr(a, "device", None):
        os.environ["TRIFECTA_BENCH_DEVICE"] = a.device  # the in-process torch section (client/bench_torch.py)
    rows: list[dict[str, Any]] = []
    out: dict[str, Any] = {
        "machine": {"cores": cores(), "cpu": platform.processor() or platform.machine(), "python": platform.python_version(), "gpu": gpu_name()},
        "load_generator": "in the bench process on the same machine (its CPU counts against the service): client/loadgen.py, asyncio HTTP/1.1 keep-alive",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": bool(a.quick),
    }
    note = " ".join(x for x in ("A --quick smoke run (fewer, shorter rounds): indicative only." if a.quick else "", getattr(a, "note", None) or "") if x)
    if note:
        out["note"] = note
    if not only or only & {"textmask", "simulated", "batching", "codecs", "shards"}:
        r = subprocess.run([sys.executable, "-m", "client.cli", "models", "fetch", "textmask"], capture_output=True, text=True)
        if r.returncode:  # offline without the model: the sections that need it fail on their own, the others run
            print(f"[bench] could not fetch the textmask model: {r.stderr.strip()[-500:]}", file=sys.stderr, flush=True)
    env = Env()
    try:
        for name, fn in SECTIONS.items():
            if only and name not in only:
                continue
            print(f"[bench] {name} ...", flush=True)
            rows += fn(env, a.quick, out)
    finally:
        env.close()
    for name, mod in EXTERNAL.items():
        if only and name not in only:
            continue
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError:
            continue
        print(f"[bench] {name} ...", flush=True)
        rows += m.run(a.quick)
        if getattr(m, "RESULTS", None):
            out[name] = m.RESULTS
    out["goals"] = rows
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(out, indent=2, default=str))
    plot(out, str(Path(a.output).with_suffix(".png")))
    t = Table(title="trifecta bench (ratios measured in this run)")
    for c in ("goal", "figure", "target", "result"):
        t.add_column(c)
    for r in rows:
        reported = r["target"] >= 1e9
        tgt = "(reported)" if reported else ("≥ " if r.get("higher_is_better", True) else "≤ ") + f"{r['target']}"
        t.add_row(r["goal"], f"{r['figure']} {r['unit']}", tgt, "[green]pass" if r["pass"] else "[red]FAIL")
    Console(width=160).print(t)
    print(f"wrote {a.output} and {Path(a.output).with_suffix('.png')}; load generator: {out['load_generator']}")
    return 0 if all(r["pass"] for r in rows) else 1
