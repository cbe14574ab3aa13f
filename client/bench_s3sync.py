"""`trifecta bench --only s3sync`: a sync call on `s3://` storage against the same call on `file://`.

Two stacks on one Redis, each one textmask worker and the API with default settings, one on
`file://` storage and one on `s3://` (moto's server over HTTP, the S3 endpoint given to the
stack being a counting proxy: client/s3count.py). Rounds alternate between them (file first
in even rounds, s3 first in odd ones); each round sends the same 240 KB PNG photo (over
INLINE_INPUT_BYTES) sequentially. Reported: sync p50 on s3 / p50 on file, from all rounds'
latencies (goal ≤ 1.3), and the storage requests per sync call on s3 (goal ≤ 1: the mask's
PUT for the record, which the worker makes after its reply), with every request kind counted.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import boto3
from moto.server import ThreadedMotoServer  # noqa: F401 - the section needs moto's server (a dev dependency)

from client import loadgen
from client.benchkit import Stack
from client.s3count import S3Counter
from tasks.embedded_redis import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "tests" / "data" / "images" / "chelsea.png"
BUCKET = "bench-s3sync"
RESULTS: dict[str, Any] = {}


def row(goal: str, figure: float, target: float, higher_is_better: bool, unit: str = "x", **details: Any) -> dict[str, Any]:
    ok = figure >= target if higher_is_better else figure <= target
    return {"goal": goal, "figure": round(float(figure), 3), "target": target, "higher_is_better": higher_is_better, "pass": bool(ok), "unit": unit, "details": details}


def _kind(method: str, query: str) -> str:
    if method == "GET" and "list-type" in query:
        return "LIST"
    if method == "POST" and "delete" in query:
        return "DELETE"
    return method


def run(quick: bool) -> list[dict[str, Any]]:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    body = PHOTO.read_bytes()
    rounds, per_round = (4, 8) if quick else (8, 20)
    tmp = Path(tempfile.mkdtemp(prefix="trifecta-bench-s3sync-"))
    redis = EmbeddedRedis(tmp / "redis", appendonly=False).start()
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    stacks: list[Stack] = []
    lat: dict[str, list[float]] = {"file": [], "s3": []}
    kinds: Counter[str] = Counter()
    calls = 1
    try:
        with S3Counter(endpoint) as counter:
            for name, storage, env in (("file", None, {}), ("s3", f"s3://{BUCKET}/trifecta", {"S3_ENDPOINT_URL": counter.url})):
                st = Stack.create(f"redis://127.0.0.1:{redis.port}/{len(stacks) + 1}", tmp / name, env=env, storage=storage)
                stacks.append(st)
                st.start_worker("textmask", f"textmask-{name}")
                st.start_api()
                st.wait_live("textmask")
            urls = {"file": stacks[0].url, "s3": stacks[1].url}
            hdr = {"Content-Type": "image/png"}
            for name in ("file", "s3"):  # warm-up: first calls, connection pools
                asyncio.run(loadgen.run(urls[name], "POST", "/run_textmask", body, hdr, 1, total=3))
            time.sleep(1.0)  # the warm-up's record PUTs (made after each reply) land before counting starts
            mark = counter.mark()  # only the s3 stack talks to S3: every request from here on is a measured call's
            for i in range(rounds):
                for name in ("file", "s3") if i % 2 == 0 else ("s3", "file"):
                    res = asyncio.run(loadgen.run(urls[name], "POST", "/run_textmask", body, hdr, 1, total=per_round))
                    if res.ok != per_round:
                        raise RuntimeError(f"{name}: {res.ok} of {per_round} sync calls succeeded ({res.statuses})")
                    lat[name] += res.latencies
            time.sleep(1.0)  # and the last call's
            calls = rounds * per_round
            kinds.update(_kind(m, q) for m, _p, q, _a, _b in counter.since(mark))
    finally:
        for st in stacks:
            st.stop()
        moto.stop()
        redis.stop()
    p50 = {k: statistics.median(v) * 1000 for k, v in lat.items()}
    ratio = p50["s3"] / p50["file"]
    per_call = sum(kinds.values()) / calls
    RESULTS.update({"p50_ms": {k: round(v, 2) for k, v in p50.items()}, "calls_per_side": len(lat["s3"]), "rounds": rounds, "image_bytes": len(body), "storage_requests_per_call": {k: round(v / calls, 3) for k, v in kinds.items()}})
    return [
        row("sync textmask p50, s3:// (moto) / file://, 240 KB PNG", ratio, 1.3, False, s3_ms=round(p50["s3"], 2), file_ms=round(p50["file"], 2), calls=len(lat["s3"])),
        row("storage requests per sync call on s3:// (the record's PUT, after the reply)", per_call, 1.0, False, unit="req", **{k: round(v / calls, 3) for k, v in kinds.items()}),
    ]
