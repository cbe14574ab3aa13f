"""`trifecta bench`: every figure a ratio to a baseline measured in the same run.

Sections (run all, or pick with --only):
  textmask   end-to-end images/s and latency at concurrency 1, 4, 16 vs the raw
             `session.run` on a prepared tensor (same INPUT_SIZE, same threads)
  dispatch   echo HTTP round trip vs a bare Celery `apply_async().get()`; echo req/s at
             concurrency 64 vs the plain solo worker's no-op tasks/s
  reject     503 latency with the queue full vs a constant-answer endpoint (/ping)
  batching   pipeline gain of MAX_BATCH_SIZE=8 over 1 vs the raw model's batch-8/batch-1 gain
  memory     API RSS and heavy imports, 1,000 waiting requests, worker RSS over 10,000 requests
  codecs     packbits encode+decode + image decode/resize at 2048 px vs one textmask call at 2048
  shards, sam3, sam3video, models   sections added by the model issues (client/bench_*.py)

The load generator runs in this process on the same machine (its CPU counts against the
service); it is a lean asyncio HTTP/1.1 loop (client/loadgen.py).
"""

from __future__ import annotations

import argparse
import asyncio
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

    def stack(self, models: list[str], env: dict[str, str] | None = None) -> Stack:
        self.db = self.db % 14 + 1
        st = Stack.create(f"redis://127.0.0.1:{self.redis.port}/{self.db}", self.tmp / f"stack{len(self.stacks)}", env=env)
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


def load(url: str, path: str, body: bytes, concurrency: int, total: int | None = None, duration: float | None = None, method: str = "POST", ok: tuple[int, ...] = (200,)) -> loadgen.Result:
    return asyncio.run(loadgen.run(url, method, path, body, PNG, concurrency, total=total, duration=duration, ok=ok))


# ------------------------------------------------------------------ raw model
def raw_runner(threads: int, input_size: int | None = None) -> Any:
    from tasks.settings import Settings
    from workers.device import Device
    from workers.runners.onnxseg import OnnxSegRunner

    r = OnnxSegRunner("textmask", Settings(model_dir=str(ROOT / "models"), input_size=input_size), Device("cpu", 0, None, threads))
    r.load()
    r.warmup()
    return r


def raw_rate(runner: Any, image: bytes, batch: int, seconds: float) -> tuple[float, float]:
    """(images/s, seconds per call) of session.run on a prepared tensor."""
    from tasks.images import decode_rgb

    x, _ = runner.preprocess(decode_rgb(image, 1 << 30))
    xb = np.stack([x] * batch)
    runner.raw_call(xb)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        runner.raw_call(xb)
        n += 1
    dt = time.perf_counter() - t0
    return n * batch / dt, dt / n


def sec_textmask(env: Env, quick: bool, out: dict[str, Any]) -> list[dict[str, Any]]:
    threads = cores()
    img = text_image()
    runner = raw_runner(threads)
    secs = 4 if quick else 10
    raw1, call_s = raw_rate(runner, img, 1, secs)  # before the stack starts: the model alone on the machine
    st = env.stack(["textmask"], {"MAX_BATCH_SIZE": "1", "INTRA_OP_THREADS": str(threads), "MAX_CONCURRENCY_PER_GPU": "2"})
    load(st.url, "/run_textmask", img, 4, total=8)
    curves = {}
    for c in (1, 4, 16):
        res = load(st.url, "/run_textmask", img, c, duration=secs)
        curves[c] = {"rps": res.rate(), "p50_ms": res.pct(50) * 1000, "p99_ms": res.pct(99) * 1000, "ok": res.ok, "statuses": res.statuses}
    st.stop()
    raw1b, call_s2 = raw_rate(runner, img, 1, secs)  # again after it stopped, so drift cancels
    raw = (raw1 + raw1b) / 2
    call_ms = (call_s + call_s2) / 2 * 1000
    out["textmask"] = {"raw_images_per_s": raw, "raw_call_ms": call_ms, "threads": threads, "input_size": runner.input_size, "curves": curves}
    c1 = curves[1]
    return [
        row("textmask end-to-end / raw images/s at concurrency 16", curves[16]["rps"] / raw, 0.9, e2e=curves[16]["rps"], raw=raw),
        row("textmask p50 latency added over the raw call (c=1), reported", c1["p50_ms"] - call_ms, 1e9, higher_is_better=False, unit="ms", p50=c1["p50_ms"], p99=c1["p99_ms"], raw_ms=call_ms, p99_added=c1["p99_ms"] - call_ms),
    ]


# ------------------------------------------------------------------ dispatch
def bare_celery(env: Env, quick: bool) -> dict[str, float]:
    st = Stack.create(f"redis://127.0.0.1:{env.redis.port}/15", env.tmp / "bare")
    w = Proc("bare", [sys.executable, "-m", "celery", "-A", "client.bench_celery", "worker", "-P", "solo", "-Q", "bare", "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING"], st.env, env.tmp / "bare.log").start()
    os.environ["REDIS_URL"] = st.env["REDIS_URL"]
    bc = importlib.reload(importlib.import_module("client.bench_celery"))
    try:
        bc.noop.apply_async(queue="bare").get(timeout=60)
        n = 300 if quick else 2000
        lat = []
        for _ in range(n):
            t0 = time.perf_counter()
            bc.noop.apply_async(queue="bare").get(timeout=30)
            lat.append(time.perf_counter() - t0)
        m = 1000 if quick else 5000
        t0 = time.perf_counter()
        rs = [bc.noop.apply_async(queue="bare") for _ in range(m)]
        for r in rs:
            r.get(timeout=120)
        rate = m / (time.perf_counter() - t0)
    finally:
        w.stop()
    lat.sort()
    return {"p50_ms": lat[len(lat) // 2] * 1000, "p99_ms": lat[int(len(lat) * 0.99)] * 1000, "tasks_per_s": rate}


def sec_dispatch(env: Env, quick: bool, out: dict[str, Any]) -> list[dict[str, Any]]:
    bare = bare_celery(env, quick)
    st = env.stack(["echo"], {"MAX_BATCH_SIZE": "64", "BATCH_TIMEOUT_MS": "0", "MAX_CONCURRENCY_PER_GPU": "1", "MAX_QUEUE_DEPTH": "100000"})
    body = b"x" * 64
    load(st.url, "/run_echo", body, 8, total=200)  # warm
    c1 = load(st.url, "/run_echo", body, 1, total=300 if quick else 2000)
    c64 = load(st.url, "/run_echo", body, 64, duration=5 if quick else 15)
    st.stop()
    ours = {"p50_ms": c1.pct(50) * 1000, "p99_ms": c1.pct(99) * 1000, "rps_c64": c64.rate(), "statuses_c64": c64.statuses}
    out["dispatch"] = {"bare_celery": bare, "trifecta_echo": ours}
    return [
        row("echo HTTP round trip p50 / bare Celery apply_async().get() p50", ours["p50_ms"] / bare["p50_ms"], 1.0, higher_is_better=False, ours_ms=ours["p50_ms"], bare_ms=bare["p50_ms"]),
        row("echo HTTP round trip p99 / bare Celery p99", ours["p99_ms"] / bare["p99_ms"], 1.0, higher_is_better=False, ours_ms=ours["p99_ms"], bare_ms=bare["p99_ms"]),
        row("echo req/s at concurrency 64 / plain solo worker no-op tasks/s", ours["rps_c64"] / bare["tasks_per_s"], 1.5, ours=ours["rps_c64"], bare=bare["tasks_per_s"]),
    ]


# ------------------------------------------------------------------ rejection
def sec_reject(env: Env, quick: bool, out: dict[str, Any]) -> list[dict[str, Any]]:
    st = env.stack(["echo"], {"MAX_QUEUE_DEPTH": "2", "MAX_BATCH_SIZE": "1", "MAX_CONCURRENCY_PER_GPU": "1"})

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
    threads = cores()
    img = text_image()
    runner = raw_runner(threads)
    secs = 4 if quick else 10
    r1, _ = raw_rate(runner, img, 1, secs)
    r8, _ = raw_rate(runner, img, 8, secs)
    del runner
    pipe = {}
    for b in (1, 8):
        st = env.stack(["textmask"], {"MAX_BATCH_SIZE": str(b), "BATCH_TIMEOUT_MS": "10", "INTRA_OP_THREADS": str(threads), "MAX_CONCURRENCY_PER_GPU": "2"})
        load(st.url, "/run_textmask", img, 4, total=8)
        pipe[b] = load(st.url, "/run_textmask", img, 16, duration=secs).rate()
        st.stop()
    raw_gain, pipe_gain = r8 / r1, pipe[8] / pipe[1]
    out["batching"] = {"raw_b1": r1, "raw_b8": r8, "pipe_b1": pipe[1], "pipe_b8": pipe[8], "raw_gain": raw_gain, "pipe_gain": pipe_gain}
    return [row("textmask batching gain kept: (pipeline b8/b1) / (raw b8/b1)", pipe_gain / raw_gain, 0.9, raw_gain=raw_gain, pipeline_gain=pipe_gain)]


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
    st = env.stack(["echo"], {"MAX_QUEUE_DEPTH": "5000", "MAX_BATCH_SIZE": "256", "BATCH_TIMEOUT_MS": "0", "MAX_CONCURRENCY_PER_GPU": "1"})
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

    from storage import codecs
    from tasks.images import decode_rgb
    from workers.runners.base import Item

    big = Image.open(io.BytesIO(text_image((2048, 2048)))).convert("RGB")
    bio = io.BytesIO()
    big.save(bio, format="JPEG", quality=90)
    jpeg = bio.getvalue()
    r = raw_runner(cores(), input_size=2048)
    reps = 2 if quick else 4
    x, _ = r.preprocess(decode_rgb(jpeg, 1 << 30))
    t0 = time.perf_counter()
    for _ in range(reps):
        y = r.raw_call(x[None])
    model_s = (time.perf_counter() - t0) / reps
    mask = y[0, 0] > 0.3
    t0 = time.perf_counter()
    for _ in range(reps * 5):
        codecs.decode_packbits(codecs.encode_packbits(mask))
    codec_s = (time.perf_counter() - t0) / (reps * 5)
    item = Item(req=None, data=jpeg)  # type: ignore[arg-type]  # prepare reads only the bytes
    r.prepare(item)
    t0 = time.perf_counter()
    for _ in range(reps * 5):
        r.prepare(item)  # the worker's own path: header, JPEG decode, letterbox, normalise
    decode_s = (time.perf_counter() - t0) / (reps * 5)
    share = (codec_s + decode_s) / model_s * 100
    out["codecs"] = {"model_ms_2048": model_s * 1000, "packbits_ms": codec_s * 1000, "decode_resize_ms": decode_s * 1000}
    return [row("packbits enc+dec + decode/resize, % of one textmask call at 2048", share, 5.0, higher_is_better=False, unit="%", model_ms=model_s * 1000, packbits_ms=codec_s * 1000, decode_resize_ms=decode_s * 1000)]


SECTIONS = {"textmask": sec_textmask, "dispatch": sec_dispatch, "reject": sec_reject, "batching": sec_batching, "memory": sec_memory, "codecs": sec_codecs}
EXTERNAL = {"shards": "client.bench_shards", "sam3": "client.bench_sam3", "sam3video": "client.bench_sam3video", "models": "client.bench_models"}


def plot(out: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    tm = out.get("textmask")
    if not tm:
        return
    cs = sorted(int(c) for c in tm["curves"])
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(cs, [tm["curves"][c]["rps"] for c in cs], "o-", label="end-to-end")
    ax[0].axhline(tm["raw_images_per_s"], color="grey", ls="--", label="raw model")
    ax[0].set(xlabel="concurrency", ylabel="images/s", title="textmask throughput")
    ax[0].legend()
    ax[1].bar([f"c={c} p50" for c in cs] + [f"c={c} p99" for c in cs], [tm["curves"][c]["p50_ms"] for c in cs] + [tm["curves"][c]["p99_ms"] for c in cs])
    ax[1].axhline(tm["raw_call_ms"], color="grey", ls="--")
    ax[1].set(ylabel="ms", title="latency (raw call dashed)")
    ax[1].tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path)


def main(a: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    only = set(a.only.split(",")) if a.only else None
    rows: list[dict[str, Any]] = []
    out: dict[str, Any] = {
        "machine": {"cores": cores(), "cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "load_generator": "in the bench process on the same machine (its CPU counts against the service): client/loadgen.py, asyncio HTTP/1.1 keep-alive",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    subprocess.run([sys.executable, "-m", "client.cli", "models", "fetch", "textmask"], check=True, capture_output=True)
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
    out["goals"] = rows
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
