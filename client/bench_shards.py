"""`trifecta bench --only shards`: a WebDataset shard through the job API vs the raw model.

One shard of 500 real photos (60 with --quick; PNG and JPEG at their own sizes, cycled
from ../shared/data/images) goes through `POST /v1/jobs` to one textmask worker; the
figure is its images/s (submit → `succeeded`, manifest written) over the raw model's
images/s: `session.run` on prepared tensors at the same input sizes (RapidOCR's sizing
of each photo, one call per image as a CPU worker makes them) and intra-op threads, measured in the same run just before and after the job (averaged, so
drift cancels). The main row gives the model one of the cores and leaves the rest to
decode/encode (the configuration a CPU shard worker should run); a reported row gives
the model every core, where decode and the model compete for the same CPU.
"""

from __future__ import annotations

import io
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from client.benchkit import Stack
from tasks import keys
from tasks.embedded_redis import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]
BATCH = 4


def _images() -> list[tuple[str, bytes]]:
    d = ROOT.parent / "shared" / "data" / "images"
    if not d.is_dir():
        d = ROOT / "tests" / "data" / "images"
    return [(p.suffix.lstrip("."), p.read_bytes()) for p in sorted(d.iterdir()) if p.suffix in (".png", ".jpg")]


def build_shard(path: Path, n: int) -> None:
    imgs = _images()
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            ext, data = imgs[i % len(imgs)]
            ti = tarfile.TarInfo(f"sample{i:05d}.{ext}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def raw_rate(runner: Any, seconds: float) -> float:
    """images/s of `session.run` on the photos' prepared tensors (preprocessed once). Each image
    has its own shape (RapidOCR's sizing), so each runs alone, as a CPU worker runs them
    (a stacked call of one shape measured slower per image on a CPU)."""
    from workers.runners.base import Item

    xs = [runner.prepare(Item(req=None, data=d)).x[None] for _, d in _images()]  # type: ignore[arg-type]
    for x in xs:
        runner.raw_call(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        for x in xs:
            runner.raw_call(x)
        n += 1
    return n * len(xs) / (time.perf_counter() - t0)


def one(tmp: Path, redis: EmbeddedRedis, db: int, samples: int, threads: int, quick: bool) -> dict[str, Any]:
    from tasks.settings import Settings
    from workers.device import Device
    from workers.runners.textdet import TextDetRunner

    shard_dir = tmp / "shards"
    shard_dir.mkdir(exist_ok=True)
    shard = shard_dir / f"bench-{samples}.tar"
    warm = shard_dir / "warm.tar"
    if not shard.exists():
        build_shard(shard, samples)
        build_shard(warm, 2 * BATCH)
    env = {"ALLOWED_INPUT_ROOTS": str(shard_dir), "INTRA_OP_THREADS": str(threads), "MAX_BATCH_SIZE": str(BATCH), "SHARD_BATCH_SIZE": str(BATCH)}
    st = Stack.create(f"redis://127.0.0.1:{redis.port}/{db}", tmp / f"stack-{threads}", env=env)
    try:
        st.start_worker("textmask", f"bench-{threads}")
        st.start_api()
        st.wait_live("textmask")
        runner = TextDetRunner("textmask", Settings(model_dir=str(ROOT / "models")), Device("cpu", 0, None, threads))
        runner.load()
        runner.warmup()
        secs = 3 if quick else 6
        before = raw_rate(runner, secs)
        # a warm-up job so the worker's first-call costs are not counted
        w = httpx.post(st.url + "/v1/jobs", json={"model": "textmask", "input": {"shards": [f"file://{warm}"]}}, timeout=30)
        _wait(st.url, w.json()["job_id"], 120)
        t0 = time.perf_counter()
        r = httpx.post(st.url + "/v1/jobs", json={"model": "textmask", "input": {"shards": [f"file://{shard}"]}, "params": {"format": "packbits"}}, timeout=30)
        r.raise_for_status()
        job = _wait(st.url, r.json()["job_id"], 1200)
        wall = time.perf_counter() - t0
        after = raw_rate(runner, secs)
    finally:
        st.stop()
    if job["status"] != "succeeded" or job["progress"]["samples_done"] != samples:
        raise RuntimeError(f"the bench job did not succeed: {job}")
    raw = (before + after) / 2
    e2e = samples / wall
    return {
        "threads": threads, "samples": samples, "e2e_images_per_s": round(e2e, 2), "raw_images_per_s": round(raw, 2), "raw_before": round(before, 2),
        "raw_after": round(after, 2), "ratio": e2e / raw, "wall_s": round(wall, 2), "job_throughput": job["progress"]["throughput"],
        "input_size": runner.input_size, "batch": BATCH,
    }


def _wait(url: str, job_id: str, timeout: float) -> dict[str, Any]:
    t_end = time.time() + timeout
    while time.time() < t_end:
        st = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        if st["status"] in keys.TERMINAL:
            return st
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} not finished in {timeout}s")


def row(goal: str, figure: float, target: float, **details: Any) -> dict[str, Any]:
    return {"goal": goal, "figure": round(float(figure), 3), "target": target, "higher_is_better": True, "pass": bool(figure >= target), "unit": "x", "details": details}


def run(quick: bool) -> list[dict[str, Any]]:
    import os

    cores = len(os.sched_getaffinity(0))
    samples = 60 if quick else 500
    tmp = Path(tempfile.mkdtemp(prefix="trifecta-bench-shards-"))
    redis = EmbeddedRedis(tmp / "redis", appendonly=False).start()
    rows = []
    try:
        main = one(tmp, redis, 1, samples, max(1, cores - 1), quick)
        rows.append(row(f"shard job / raw textmask images/s, 1 worker, {main['threads']} model thread(s) of {cores} cores", main["ratio"], 0.9, **main))
        if not quick and cores > 1:
            every = one(tmp, redis, 2, samples, cores, quick)
            rows.append(row(f"shard job / raw textmask images/s, model on all {cores} cores (decode competes), reported", every["ratio"], 0.0, **every))
    finally:
        redis.stop()
    return rows


if __name__ == "__main__":
    import json
    import sys

    for r in run("--quick" in sys.argv):
        print(json.dumps(r))
