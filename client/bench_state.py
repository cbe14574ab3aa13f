"""`trifecta bench --only state`: what each kind of request leaves behind in Redis and storage.

One stack (an echo and a textmask worker) on its own Redis, with short lifetimes for the run
(SYNC_RESULT_TTL_S, RESULT_TTL_SECONDS, JANITOR_INTERVAL_S). For each kind of request —
sync echo, sync textmask, image job, shard sample — a batch is sent and the difference in
Redis (used memory less client buffers, keys) and storage (bytes, objects) is measured twice:
right after the batch (the state the lifetime keeps) and once the lifetimes have passed and
the janitor ran (what stays for good). Figures are per request. From them the section
computes the steady state at a given request rate with the default lifetimes (the capacity
table of docs/state.md).
"""

from __future__ import annotations

import asyncio
import base64
import io
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis
from kombu.transport.redis import Channel as KombuChannel

from client import loadgen
from client.benchkit import Stack
from tasks import keys, queuekeys
from tasks.embedded_redis import EmbeddedRedis
from tasks.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SYNC_TTL_S = 20
JOB_TTL_S = 60  # longer than a batch of jobs or the shard job takes
JANITOR_S = 1.0
TOMBSTONE_S = keys.TOMBSTONE_S
SIZE = {"hash": "hlen", "zset": "zcard", "set": "scard", "list": "llen", "stream": "xlen", "string": "strlen"}
# the stacks this bench starts inherit this environment: the same BROKER_GLOBAL_KEYPREFIX, the same kombu key names
QK = queuekeys.for_settings(Settings())
# kombu's in-flight bookkeeping and the janitor's lock come and go with the traffic of the moment
TRANSIENT = {n.encode() for n in (QK.unacked, QK.unacked_index, QK.prefix + KombuChannel.unacked_mutex_key, keys.JANITOR_LOCK)}


def redis_state(r: redis.Redis) -> dict[str, Any]:
    """Used memory (less client buffers, which follow connections, not state), the memory of the
    data itself (every key's MEMORY USAGE plus the database's hash tables: free of allocator,
    Lua and buffer noise, which is a few tens of KB either way), key count, and every key's
    type, length and TTL."""
    info = r.info("memory")
    pipe = r.pipeline(transaction=False)
    names = list(r.scan_iter(count=1000))
    for k in names:
        pipe.type(k)
    types = [t.decode() for t in pipe.execute()]
    pipe = r.pipeline(transaction=False)
    for k, t in zip(names, types, strict=True):
        getattr(pipe, SIZE.get(t, "exists"))(k)
        pipe.ttl(k)
    res = pipe.execute()
    per = {k: (t, int(res[2 * i]), int(res[2 * i + 1])) for i, (k, t) in enumerate(zip(names, types, strict=True))}
    pipe = r.pipeline(transaction=False)
    for k in names:
        pipe.memory_usage(k, samples=0)
    db = r.memory_stats().get(f"db.{r.connection_pool.connection_kwargs.get('db', 0)}", {})
    key_bytes = sum(int(x or 0) for x in pipe.execute()) + int(db.get("overhead.hashtable.main", 0)) + int(db.get("overhead.hashtable.expires", 0))
    clients = int(info.get("mem_clients_normal", 0))
    return {"used": int(info["used_memory"]), "clients": clients, "data": int(info["used_memory"]) - clients, "key_bytes": key_bytes, "keys": len(per), "per_key": per}


def growth(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Keys that appeared (transient ones aside) and collections that grew, between two `redis_state`s."""
    b, a = before["per_key"], after["per_key"]
    new = sorted(k.decode() for k in set(a) - set(b) - TRANSIENT)
    grew = {k.decode(): (b[k][1], a[k][1]) for k in set(a) & set(b) if k not in TRANSIENT and a[k][0] != "string" and a[k][1] > b[k][1] and not k.startswith(b"tf:worker:")}
    return {"new_keys": new, "grown": grew}


def storage_state(root: Path) -> tuple[int, int]:
    """(bytes, objects) under a file:// store's root."""
    n = size = 0
    for p in root.rglob("*"):
        if p.is_file() and not p.name.startswith(".tmp-"):
            n += 1
            size += p.stat().st_size
    return size, n


def settle(r: redis.Redis, timeout: float = 60) -> None:
    """Until no job record and no expiry index entry remains (lifetimes passed, janitor ran)."""
    t_end = time.time() + timeout
    while time.time() < t_end:
        if not any(True for _ in r.scan_iter(match="tf:job:*", count=1000)) and not r.zcard(keys.EXPIRY) and not r.llen(QK.queue("textmask")) and not r.llen(QK.queue("echo")):
            time.sleep(JANITOR_S * 2)  # one more janitor pass and Redis's active expiry cycle
            return
        time.sleep(0.2)
    raise TimeoutError("records or expiry index entries did not go away")


def text_png() -> bytes:
    from PIL import Image, ImageDraw, ImageFont

    im = Image.open(ROOT / "tests" / "data" / "images" / "chelsea.png").convert("RGB")
    ImageDraw.Draw(im).text((20, 20), "HELLO WORLD 42", fill=(255, 255, 255), font=ImageFont.load_default(size=36))
    bio = io.BytesIO()
    im.save(bio, format="PNG")
    return bio.getvalue()


def small_jpeg() -> bytes:
    """A photo small enough to travel inline in the queue message (below INLINE_INPUT_BYTES), as most sync calls do."""
    from PIL import Image

    im = Image.open(ROOT / "tests" / "data" / "images" / "chelsea.png").convert("RGB").resize((320, 240))
    bio = io.BytesIO()
    im.save(bio, format="JPEG", quality=85)
    return bio.getvalue()


def _load(url: str, path: str, body: bytes, ctype: str, concurrency: int, total: int) -> loadgen.Result:
    return asyncio.run(loadgen.run(url, "POST", path, body, {"Content-Type": ctype}, concurrency, total=total))


def _wait_jobs(url: str, ids: list[str], timeout: float = 600) -> None:
    t_end = time.time() + timeout
    left = list(ids)
    with httpx.Client(timeout=10) as c:
        while left and time.time() < t_end:
            left = [j for j in left if c.get(f"{url}/v1/jobs/{j}").json()["status"] not in keys.TERMINAL]
            time.sleep(0.2)
    if left:
        raise TimeoutError(f"{len(left)} job(s) did not finish")


def measure(kind: str, n: int, send: Any, r: redis.Redis, data_root: Path, wait_s: float, per_record: int = 1) -> dict[str, Any]:
    """Baseline, send (returns the number of requests), state right after, state after the lifetimes.

    "Right after" is what a request holds while its lifetime lasts: the difference divided by
    the requests whose record is still alive then (on a slow machine the first records of a
    batch may have expired already, their outputs deleted); `per_record` requests share one
    record (a shard job's samples). "After" is divided by every request sent."""
    settle(r)
    r0, s0 = redis_state(r), storage_state(data_root)
    sent = send()
    time.sleep(3)  # the last FINISH pipelines, and Redis's cron shrinking client buffers back
    r1, s1 = redis_state(r), storage_state(data_root)
    time.sleep(wait_s)
    settle(r)
    r2, s2 = redis_state(r), storage_state(data_root)
    per = max(1, sent)
    alive = sum(1 for k in r1["per_key"] if k.startswith(b"tf:job:") and k not in r0["per_key"])
    if not alive:
        raise RuntimeError(f"{kind}: every record expired before the batch ended; lengthen the lifetimes of the run")
    live = min(per, alive * per_record)
    return {
        "kind": kind,
        "requests": sent,
        "alive_right_after": live,
        "redis_bytes_right_after": round((r1["key_bytes"] - r0["key_bytes"]) / live, 1),
        "used_memory_right_after": round((r1["data"] - r0["data"]) / live, 1),
        "redis_keys_right_after": round((r1["keys"] - r0["keys"]) / live, 3),
        "storage_bytes_right_after": round((s1[0] - s0[0]) / live, 1),
        "storage_objects_right_after": round((s1[1] - s0[1]) / live, 3),
        "redis_bytes_after_ttl": round((r2["key_bytes"] - r0["key_bytes"]) / per, 1),
        "used_memory_after_ttl": round((r2["data"] - r0["data"]) / per, 1),
        "redis_keys_after_ttl": round((r2["keys"] - r0["keys"]) / per, 3),
        "storage_bytes_after_ttl": round((s2[0] - s0[0]) / per, 1),
        "storage_objects_after_ttl": round((s2[1] - s0[1]) / per, 3),
        "left_after_ttl": growth(r0, r2),
    }


def capacity(figs: dict[str, dict[str, Any]], rates: tuple[int, ...] = (10, 100, 1000)) -> list[dict[str, Any]]:
    """Steady state at `rates` requests/s with the default lifetimes, from the measured figures:
    what a request holds while its lifetime lasts, times the requests alive at once."""
    d = Settings()
    out = []
    for kind, f in figs.items():
        life = d.sync_result_ttl_s if kind.startswith("sync") else d.result_ttl_seconds
        for rate in rates:
            alive = rate * life
            forever = rate * (TOMBSTONE_S if not kind.startswith("sync") else 0)  # tombstones, 7 days past the record
            out.append(
                {
                    "kind": kind,
                    "rate_per_s": rate,
                    "lifetime_s": life,
                    "redis_mb": round((alive * max(0.0, f["redis_bytes_right_after"] - f["redis_bytes_after_ttl"]) + forever * max(0.0, f["redis_bytes_after_ttl"])) / 1e6, 1),
                    "storage_gb": round(alive * f["storage_bytes_right_after"] / 1e9, 2),
                    "storage_objects_m": round(alive * f["storage_objects_right_after"] / 1e6, 2),
                }
            )
    return out


def run(quick: bool) -> list[dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="trifecta-bench-state-"))
    srv = EmbeddedRedis(tmp / "redis", appendonly=False).start()
    shard_dir = tmp / "shards"
    shard_dir.mkdir()
    env = {
        "SYNC_RESULT_TTL_S": str(SYNC_TTL_S),
        "RESULT_TTL_SECONDS": str(JOB_TTL_S),
        "JANITOR_INTERVAL_S": str(JANITOR_S),
        "MAX_QUEUE_DEPTH": "10000",
        "ALLOWED_INPUT_ROOTS": str(shard_dir),
        "INTRA_OP_THREADS": "1",
    }
    st = Stack.create(srv.url, tmp / "stack", env=env)
    data_root = tmp / "stack" / "data"
    n_echo, n_text, n_jobs, n_samples = (500, 40, 20, 40) if quick else (3000, 160, 40, 100)
    figs: dict[str, dict[str, Any]] = {}
    try:
        st.start_worker("echo", "echo-state")
        st.start_worker("textmask", "textmask-state")
        st.start_api()
        st.wait_live("echo")
        st.wait_live("textmask")
        r = st.redis
        echo_body, photo = b"x" * 1024, text_png()
        small = small_jpeg()
        # warm-up of every kind at the concurrencies measured, so connection pools, script caches
        # and first-call allocations are in the baseline
        _load(st.url, "/run_echo", echo_body, "application/octet-stream", 8, 200)
        _load(st.url, "/run_textmask", small, "image/jpeg", 2, 10)
        _load(st.url, "/run_textmask", photo, "image/png", 2, 4)

        def sync(path: str, body: bytes, ctype: str, conc: int, n: int) -> Any:
            def send() -> int:
                res = _load(st.url, path, body, ctype, conc, n)
                if res.ok != n:
                    raise RuntimeError(f"{path}: {res.ok} of {n} answered 200 ({res.statuses})")
                return n

            return send

        def jobs(n: int) -> int:
            b64 = base64.b64encode(small).decode()
            with httpx.Client(timeout=30) as c:
                ids = [c.post(st.url + "/v1/jobs", json={"model": "textmask", "input": {"image": b64}, "params": {"format": "png"}}).json()["job_id"] for _ in range(n)]
            _wait_jobs(st.url, ids)
            return n

        def shard(n: int) -> int:
            path = shard_dir / f"state-{n}.tar"
            with tarfile.open(path, "w") as tf:
                for i in range(n):
                    ti = tarfile.TarInfo(f"s{i:05d}.jpg")
                    ti.size = len(small)
                    tf.addfile(ti, io.BytesIO(small))
            job = httpx.post(st.url + "/v1/jobs", json={"model": "textmask", "input": {"shards": [f"file://{path}"]}}, timeout=30).json()["job_id"]
            _wait_jobs(st.url, [job])
            return n

        jobs(10)
        shard(8)
        figs["sync echo"] = measure("sync echo", n_echo, sync("/run_echo", echo_body, "application/octet-stream", 8, n_echo), r, data_root, SYNC_TTL_S)
        figs["sync textmask (inline input)"] = measure("sync textmask (inline input)", n_text, sync("/run_textmask", small, "image/jpeg", 2, n_text), r, data_root, SYNC_TTL_S)
        figs["sync textmask (staged input)"] = measure("sync textmask (staged input)", n_text // 2, sync("/run_textmask", photo, "image/png", 2, n_text // 2), r, data_root, SYNC_TTL_S)
        figs["image job"] = measure("image job", n_jobs, lambda: jobs(n_jobs), r, data_root, JOB_TTL_S)
        figs["shard sample"] = measure("shard sample", n_samples, lambda: shard(n_samples), r, data_root, JOB_TTL_S, per_record=n_samples)
    finally:
        st.stop()
        srv.stop()
    cap = capacity(figs)
    _print(figs, cap)
    rows = []
    for kind, f in figs.items():
        sync_kind = kind.startswith("sync")
        goal = f"{kind}: Redis bytes (keys + tables) left per request after its lifetime" + ("" if sync_kind else " (the 7-day tombstone, reported)")
        rows.append(
            {
                "goal": goal,
                "figure": f["redis_bytes_after_ttl"],
                "target": 100 if sync_kind else 1e9,
                "higher_is_better": False,
                "pass": bool(f["redis_bytes_after_ttl"] <= (100 if sync_kind else 1e9)) and (not sync_kind or (f["storage_objects_after_ttl"] == 0 and not f["left_after_ttl"]["new_keys"])),
                "unit": "B",
                "details": f,
            }
        )
    echo = figs["sync echo"]
    rows.append(
        {
            "goal": f"sync echo: Redis used_memory (less client buffers) left per request after its lifetime, {echo['requests']} requests",
            "figure": echo["used_memory_after_ttl"],
            "target": 100,
            "higher_is_better": False,
            "pass": bool(echo["used_memory_after_ttl"] <= 100),
            "unit": "B",
            "details": {},
        }
    )
    rows.append(
        {
            "goal": "capacity: Redis MB and storage at 10/100/1000 requests/s with the default lifetimes (reported)",
            "figure": 0,
            "target": 1e9,
            "higher_is_better": False,
            "pass": True,
            "unit": "",
            "details": {"table": cap},
        }
    )
    return rows


def _print(figs: dict[str, dict[str, Any]], cap: list[dict[str, Any]]) -> None:
    print(
        "| kind | requests (alive right after) | Redis B/req while kept (used_memory) | keys/req | storage B/req | objects/req | Redis B/req after (used_memory) | keys/req after | storage B/req after | objects/req after |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for k, f in figs.items():
        print(
            f"| {k} | {f['requests']} ({f['alive_right_after']}) | {f['redis_bytes_right_after']} ({f['used_memory_right_after']}) | {f['redis_keys_right_after']} | {f['storage_bytes_right_after']} | "
            f"{f['storage_objects_right_after']} | {f['redis_bytes_after_ttl']} ({f['used_memory_after_ttl']}) | {f['redis_keys_after_ttl']} | {f['storage_bytes_after_ttl']} | {f['storage_objects_after_ttl']} |"
        )
    print("\n| kind | req/s | lifetime | Redis MB | storage GB | objects (M) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for c in cap:
        print(f"| {c['kind']} | {c['rate_per_s']} | {c['lifetime_s']} s | {c['redis_mb']} | {c['storage_gb']} | {c['storage_objects_m']} |")


if __name__ == "__main__":
    import json
    import sys

    for row in run("--quick" in sys.argv):
        print(json.dumps(row, default=str))
