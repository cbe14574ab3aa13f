"""`trifecta bench --only simulated`: what one worker's host side can feed an accelerator.

The `simulated` model does a GPU textmask worker's host work with textmask's own code (decode,
RapidOCR's scaling and padding; the resize and normalisation are the device's, as with
ORT_DEVICE_PREPROCESS) and encodes a mask like textmask, but its model call sleeps
SIM_BATCH_MS + SIM_IMAGE_MS x n without CPU: a GPU's cost shape. The device's own maximum is
its rate at batch 16,

    16 / (SIM_BATCH_MS + 16 x SIM_IMAGE_MS) images per ms  (8 + 2 x 16 = 40 ms: 400 images/s).

Goal row: a bulk job (one WebDataset shard of 512x512 JPEGs, `POST /v1/jobs`, submit to
`succeeded`) through one worker, as a share of that maximum, with the worker's CPU per image:
the way a host keeps an accelerator busy, and nothing but the worker works per image. It runs
MAX_BATCH_SIZE=16 (the batch the device's maximum is defined at), every other setting default.

Reported rows: the same images as sync requests (`POST /run_simulated`, enough concurrency to
keep two batches of 16 in flight), at MAX_BATCH_SIZE=16 and at all defaults, with the CPU per
image of the API, worker and Redis. On a small host these share its cores with the load
generator, so they show what the sync path costs, not what a worker can feed.
"""

from __future__ import annotations

import io
import statistics
from pathlib import Path
from typing import Any

from client.cpuacct import CpuMeter

ROOT = Path(__file__).resolve().parents[1]
BATCH = 16
CONCURRENCY = 48  # 2 batches of 16 in flight (MAX_CONCURRENCY_PER_GPU=2) and one more queued; under MAX_QUEUE_DEPTH (64)


def jpeg_512() -> bytes:
    from PIL import Image

    bio = io.BytesIO()
    Image.open(ROOT / "tests" / "data" / "images" / "astronaut.png").convert("RGB").save(bio, format="JPEG", quality=90)
    return bio.getvalue()


def device_max(batch_ms: float, image_ms: float, batch: int = BATCH) -> float:
    """Images/s of the simulated device at `batch` (its best rate for batches up to it)."""
    return batch / (batch_ms + image_ms * batch) * 1000


def shard_rounds(env: Any, body: bytes, n: int, rounds: int) -> dict[str, Any]:
    """A shard of n copies of `body` through a bulk job on one worker, `rounds` times."""
    import tarfile
    import time

    import httpx

    from client.bench_shards import _wait

    d = env.tmp / "simulated-shards"
    d.mkdir(exist_ok=True)
    for name, count in (("big.tar", n), ("warm.tar", 2 * BATCH)):
        with tarfile.open(d / name, "w") as tf:
            for i in range(count):
                ti = tarfile.TarInfo(f"s{i:05d}.jpg")
                ti.size = len(body)
                tf.addfile(ti, io.BytesIO(body))
    st = env.stack(["simulated"], {"ALLOWED_INPUT_ROOTS": str(d), "MAX_BATCH_SIZE": str(BATCH)}, defaults=True)
    pids = {"api": st.api.p.pid, "worker": st.workers[0].p.pid, "redis": env.redis.proc.pid}
    runs = []
    try:
        w = httpx.post(st.url + "/v1/jobs", json={"model": "simulated", "input": {"shards": [f"file://{d}/warm.tar"]}}, timeout=30)
        _wait(st.url, w.json()["job_id"], 120)
        for _ in range(rounds):
            meter = CpuMeter(pids).start()
            t0 = time.perf_counter()
            r = httpx.post(st.url + "/v1/jobs", json={"model": "simulated", "input": {"shards": [f"file://{d}/big.tar"]}, "params": {"format": "packbits"}}, timeout=30)
            job = _wait(st.url, r.json()["job_id"], 600)
            wall = time.perf_counter() - t0
            cpu = meter.stop()
            if job["status"] != "succeeded" or job["progress"]["samples_done"] != n:
                raise RuntimeError(f"the simulated bulk job did not succeed: {job}")
            runs.append({"rate": n / wall, "wall_s": wall, "cpu_ms": sum(cpu.values()) / n * 1000, **{f"cpu_ms_{k}": v / n * 1000 for k, v in cpu.items()}})
    finally:
        st.stop()
    return {"median": {k: statistics.median(x[k] for x in runs) for k in runs[0]}, "rounds": runs, "samples": n}


def sec_simulated(env: Any, quick: bool, out: dict[str, Any]) -> list[dict[str, Any]]:
    from client.bench import load, row
    from tasks.settings import Settings

    f = Settings.model_fields
    batch_ms, image_ms = float(f["sim_batch_ms"].default), float(f["sim_image_ms"].default)
    top = device_max(batch_ms, image_ms)
    body = jpeg_512()
    hdr = {"Content-Type": "image/jpeg"}
    secs = 4.0 if quick else 8.0
    rounds = 1 if quick else 3
    res: dict[str, Any] = {"sim_batch_ms": batch_ms, "sim_image_ms": image_ms, "device_max_images_per_s": top, "input": "astronaut.png as 512x512 JPEG q90", "concurrency": CONCURRENCY, "configs": {}}
    bulk = shard_rounds(env, body, 600 if quick else 2400, rounds)
    res["bulk"] = bulk
    med = bulk["median"]
    where = {k.removeprefix("cpu_ms_"): round(v, 2) for k, v in med.items() if k.startswith("cpu_ms_")}
    rows = [
        row("simulated device fed by one worker (bulk shard job, MAX_BATCH_SIZE=16, other settings default): images/s / device max at batch 16", med["rate"] / top, 0.8, images_per_s=med["rate"], device_max=top, samples=bulk["samples"]),
        row("simulated bulk pipeline CPU per image (MAX_BATCH_SIZE=16), reported", med["cpu_ms"], 1e9, higher_is_better=False, unit="ms", by_process=where),
    ]
    for label, extra in (("sync, MAX_BATCH_SIZE=16, other settings default", {"MAX_BATCH_SIZE": str(BATCH)}), ("sync, all settings default", {})):
        st = env.stack(["simulated"], extra, defaults=True)
        pids = {"api": st.api.p.pid, "worker": st.workers[0].p.pid, "redis": env.redis.proc.pid}
        try:
            load(st.url, "/run_simulated", body, 8, total=32, headers=hdr)  # warm
            runs = []
            for _ in range(rounds):
                meter = CpuMeter(pids).start()
                r = load(st.url, "/run_simulated", body, CONCURRENCY, duration=secs, headers=hdr)
                cpu = meter.stop()
                n = max(1, r.ok)
                runs.append(
                    {
                        "rate": r.rate(),
                        "ok": r.ok,
                        "not_ok": sum(v for k, v in r.statuses.items() if k != 200) + r.errors,
                        "p50_ms": r.pct(50) * 1000,
                        "cpu_ms": sum(cpu.values()) / n * 1000,
                        **{f"cpu_ms_{k}": v / n * 1000 for k, v in cpu.items()},
                    }
                )
            prep = st.redis.hget(f"tf:worker:{st.workers[0].name}", "info")
        finally:
            st.stop()
        med = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
        res["configs"][label] = {"median": med, "rounds": runs, "worker_info": prep.decode() if prep else None}
        where = {k.removeprefix("cpu_ms_"): round(v, 2) for k, v in med.items() if k.startswith("cpu_ms_")}
        rows.append(row(f"simulated device fed through sync requests ({label}): images/s / device max, reported", med["rate"] / top, 1e9, higher_is_better=False, images_per_s=med["rate"], device_max=top))
        rows.append(row(f"simulated sync pipeline CPU per image ({label}), reported", med["cpu_ms"], 1e9, higher_is_better=False, unit="ms", by_process=where))
    out["simulated"] = res
    return rows
