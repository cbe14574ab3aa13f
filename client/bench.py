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
    from workers.device import Device, keep_big_buffers
    from workers.runners.onnxseg import OnnxSegRunner

    keep_big_buffers()  # as a worker process does (workers/service.py run_worker)

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


_median = statistics.median


def sec_textmask(env: Env, quick: bool, out: dict[str, Any]) -> list[dict[str, Any]]:
    threads = cores()
    img = text_image()
    runner = raw_runner(threads)
    secs = 4 if quick else 8
    rounds = 2 if quick else 4
    st = env.stack(["textmask"], {"MAX_BATCH_SIZE": "1", "INTRA_OP_THREADS": str(threads), "MAX_CONCURRENCY_PER_GPU": "2"})
    load(st.url, "/run_textmask", img, 4, total=8)
    curves = {}
    for c in (1, 4):
        res = load(st.url, "/run_textmask", img, c, duration=secs)
        curves[c] = {"rps": res.rate(), "p50_ms": res.pct(50) * 1000, "p99_ms": res.pct(99) * 1000, "ok": res.ok, "statuses": res.statuses}
    # the goal's pair, alternated round by round (raw, end-to-end, raw, ...) so that the host's
    # load, which comes and goes on a shared machine, weighs on both sides alike; the idle
    # worker holds its model but uses no CPU while the raw rounds run
    raws, calls, e2es, lat = [], [], [], []
    statuses: dict[int, int] = {}
    for _ in range(rounds):
        r, cs = raw_rate(runner, img, 1, secs)
        raws.append(r)
        calls.append(cs)
        res = load(st.url, "/run_textmask", img, 16, duration=secs)
        e2es.append(res.rate())
        lat += res.latencies
        for k, v in res.statuses.items():
            statuses[k] = statuses.get(k, 0) + v
    r, cs = raw_rate(runner, img, 1, secs)
    raws.append(r)
    calls.append(cs)
    st.stop()
    ratios = [e / ((raws[i] + raws[i + 1]) / 2) for i, e in enumerate(e2es)]  # each round against the raw rounds around it
    lat.sort()
    curves[16] = {"rps": _median(e2es), "p50_ms": lat[len(lat) // 2] * 1000, "p99_ms": lat[int(len(lat) * 0.99)] * 1000, "ok": len(lat), "statuses": statuses}
    raw = _median(raws)
    call_ms = _median(calls) * 1000
    out["textmask"] = {"raw_images_per_s": raw, "raw_call_ms": call_ms, "threads": threads, "input_size": runner.input_size, "curves": curves, "rounds": {"raw": raws, "e2e": e2es, "ratios": ratios}}
    c1 = curves[1]
    return [
        row("textmask end-to-end / raw images/s at concurrency 16", _median(ratios), 0.9, e2e=_median(e2es), raw=raw, rounds=ratios),
        row("textmask p50 latency added over the raw call (c=1), reported", c1["p50_ms"] - call_ms, 1e9, higher_is_better=False, unit="ms", p50=c1["p50_ms"], p99=c1["p99_ms"], raw_ms=call_ms, p99_added=c1["p99_ms"] - call_ms),
    ]


# ------------------------------------------------------------------ dispatch
def sec_dispatch(env: Env, quick: bool, out: dict[str, Any]) -> list[dict[str, Any]]:
    """Both sides up at once, measured in alternating blocks (bare, ours, bare, ...), so a
    shared host's load that comes and goes weighs on both alike; both workers idle (blocked
    in BRPOP) while the other side runs."""
    bst = Stack.create(f"redis://127.0.0.1:{env.redis.port}/15", env.tmp / "bare")
    w = Proc("bare", [sys.executable, "-m", "celery", "-A", "client.bench_celery", "worker", "-P", "solo", "-Q", "bare", "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING"], bst.env, env.tmp / "bare.log").start()
    os.environ["REDIS_URL"] = bst.env["REDIS_URL"]
    bc = importlib.reload(importlib.import_module("client.bench_celery"))
    st = env.stack(["echo"], {"MAX_BATCH_SIZE": "64", "BATCH_TIMEOUT_MS": "0", "MAX_CONCURRENCY_PER_GPU": "1", "MAX_QUEUE_DEPTH": "100000"})
    body = b"x" * 64
    rounds, block = (2, 150) if quick else (5, 400)
    bare_lat: list[float] = []
    ours_lat: list[float] = []
    bare_rate: list[float] = []
    ours_rate: list[float] = []
    statuses: dict[int, int] = {}
    try:
        bc.noop.apply_async(queue="bare").get(timeout=60)
        load(st.url, "/run_echo", body, 8, total=200)  # warm
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
        gc.collect()  # celery's AsyncResults unsubscribe in __del__: while Redis is still up
    finally:
        w.stop()
        st.stop()

    def pct(xs: list[float], p: float) -> float:
        return loadgen.Result(latencies=xs).pct(p) * 1000

    bare = {"p50_ms": pct(bare_lat, 50), "p99_ms": pct(bare_lat, 99), "tasks_per_s": _median(bare_rate), "rounds_tasks_per_s": bare_rate}
    ours = {"p50_ms": pct(ours_lat, 50), "p99_ms": pct(ours_lat, 99), "rps_c64": _median(ours_rate), "rounds_rps_c64": ours_rate, "statuses_c64": statuses}
    out["dispatch"] = {"bare_celery": bare, "trifecta_echo": ours, "rounds": rounds, "block": block}
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
    secs = 4 if quick else 6
    rounds = 2 if quick else 3
    stacks = {b: env.stack(["textmask"], {"MAX_BATCH_SIZE": str(b), "BATCH_TIMEOUT_MS": "10", "INTRA_OP_THREADS": str(threads), "MAX_CONCURRENCY_PER_GPU": "2"}) for b in (1, 8)}
    for st in stacks.values():
        load(st.url, "/run_textmask", img, 4, total=8)
    raw: dict[int, list[float]] = {1: [], 8: []}
    pipe: dict[int, list[float]] = {1: [], 8: []}
    for _ in range(rounds):  # alternated, so the host's load weighs on all four alike; idle workers use no CPU
        for b in (1, 8):
            raw[b].append(raw_rate(runner, img, b, secs)[0])
            pipe[b].append(load(stacks[b].url, "/run_textmask", img, 16, duration=secs).rate())
    for st in stacks.values():
        st.stop()
    del runner
    r1, r8, p1, p8 = _median(raw[1]), _median(raw[8]), _median(pipe[1]), _median(pipe[8])
    raw_gain, pipe_gain = r8 / r1, p8 / p1
    out["batching"] = {"raw_b1": r1, "raw_b8": r8, "pipe_b1": p1, "pipe_b8": p8, "raw_gain": raw_gain, "pipe_gain": pipe_gain, "rounds": {"raw": raw, "pipe": pipe}}
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
    from workers.runners.base import Item

    big = Image.open(io.BytesIO(text_image((2048, 2048)))).convert("RGB")
    bio = io.BytesIO()
    big.save(bio, format="JPEG", quality=90)
    jpeg = bio.getvalue()
    r = raw_runner(cores(), input_size=2048)
    reps = 3 if quick else 7
    item = Item(req=None, data=jpeg)  # type: ignore[arg-type]  # prepare reads only the bytes
    x, _, _ = r.prepare(item)
    y = r.raw_call(x[None])
    mask = y[0, 0] > 0.3
    models, codecs_s, decodes = [], [], []
    for _ in range(reps):  # alternated, medians: a shared host's load weighs on both sides alike
        t0 = time.perf_counter()
        r.raw_call(x[None])
        models.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(3):
            codecs.decode_packbits(codecs.encode_packbits(mask))
        codecs_s.append((time.perf_counter() - t0) / 3)
        t0 = time.perf_counter()
        for _ in range(3):
            r.prepare(item)  # the worker's own path: header, JPEG decode, letterbox, normalise
        decodes.append((time.perf_counter() - t0) / 3)
    model_s, codec_s, decode_s = _median(models), _median(codecs_s), _median(decodes)
    share = (codec_s + decode_s) / model_s * 100
    out["codecs"] = {"model_ms_2048": model_s * 1000, "packbits_ms": codec_s * 1000, "decode_resize_ms": decode_s * 1000}
    return [row("packbits enc+dec + decode/resize, % of one textmask call at 2048", share, 5.0, higher_is_better=False, unit="%", model_ms=model_s * 1000, packbits_ms=codec_s * 1000, decode_resize_ms=decode_s * 1000)]


SECTIONS = {"textmask": sec_textmask, "dispatch": sec_dispatch, "reject": sec_reject, "batching": sec_batching, "memory": sec_memory, "codecs": sec_codecs}
EXTERNAL = {"shards": "client.bench_shards", "sam3": "client.bench_sam3", "sam3video": "client.bench_sam3video", "models": "client.bench_models", "state": "client.bench_state"}


def plot(out: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed (pip install -e '.[dev]'): no plot at {path}", file=sys.stderr)
        return
    tm = out.get("textmask")
    if not tm:
        return
    curves = {int(c): v for c, v in tm["curves"].items()}  # int keys in a run, str keys read back from bench.json
    cs = sorted(curves)
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(cs, [curves[c]["rps"] for c in cs], "o-", label="end-to-end")
    ax[0].axhline(tm["raw_images_per_s"], color="grey", ls="--", label="raw model")
    ax[0].set(xlabel="concurrency", ylabel="images/s", title="textmask throughput")
    ax[0].legend()
    ax[1].bar([f"c={c} p50" for c in cs] + [f"c={c} p99" for c in cs], [curves[c]["p50_ms"] for c in cs] + [curves[c]["p99_ms"] for c in cs])
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
