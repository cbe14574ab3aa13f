"""Bench section `redisops`: the Redis work one sync request costs, counted by Redis itself.

The hot path was built to a budget of Redis round trips per request (the API: one pipeline to
submit, the wake-up from one shared subscription; the worker: kombu's fetch with START riding in
it, one FINISH transaction that also acks). This section counts what a running stack really
sends, so a refactor that adds a round trip shows here, not in a profile months later:

- `total_reads_processed` (INFO stats): read events on client sockets, one per request a client
  writes — a pipeline or a MULTI counts once, which is what a round trip is;
- `total_commands_processed`: the commands themselves (a script's inner calls included).

N sequential sync echo calls (concurrency 1: a batch of one each, the most a request ever pays),
minus what the same stack does idle for the same wall time (heartbeats, the API's refresh).
Also a script: `python -m client.bench_redisops [N]` prints the figures for the code on
PYTHONPATH, to compare two checkouts.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from client.benchkit import Stack
from tasks.embedded_redis import EmbeddedRedis

# measured with this script on the code before the job-store and ModelSpec refactors (commit
# be3705a) on the same machine: the target the refactored code must not exceed
BEFORE = {"reads_per_request": 4.08, "commands_per_request": 27.02}  # medians of 3 runs of 300 requests


def _stats(r: redis.Redis) -> tuple[int, int]:
    s = r.info("stats")
    return int(s["total_reads_processed"]), int(s["total_commands_processed"])


def count(stack: Stack, r: redis.Redis, n: int) -> dict[str, Any]:
    """Redis reads and commands per sync echo request on `stack`, its idle traffic subtracted."""
    with httpx.Client(timeout=30) as c:
        for _ in range(20):  # warm: connections opened, scripts loaded
            c.post(stack.url + "/run_echo", content=b"x" * 64, headers={"Content-Type": "image/png"}).raise_for_status()
        r0, c0 = _stats(r)
        t0 = time.perf_counter()
        for _ in range(n):
            resp = c.post(stack.url + "/run_echo", content=b"x" * 64, headers={"Content-Type": "image/png"})
            resp.raise_for_status()
        busy = time.perf_counter() - t0
        r1, c1 = _stats(r)
    time.sleep(busy)  # the same wall time idle: heartbeats, refreshes, the janitor
    r2, c2 = _stats(r)
    idle_r, idle_c = (r2 - r1) - 2, (c2 - c1) - 2  # less this function's own two INFO calls
    return {
        "requests": n,
        "seconds": busy,
        "reads_per_request": ((r1 - r0) - idle_r) / n,
        "commands_per_request": ((c1 - c0) - idle_c) / n,
        "idle_reads": idle_r,
        "idle_commands": idle_c,
    }


RESULTS: dict[str, Any] = {}


def _measure(n: int) -> dict[str, Any]:
    """An echo stack (default settings) on its own embedded Redis, counted over n requests."""
    from client.bench import strip_settings

    tmp = Path(tempfile.mkdtemp(prefix="trifecta-redisops-"))
    srv = EmbeddedRedis(tmp / "redis", appendonly=False).start()
    try:
        st = Stack.create(f"redis://127.0.0.1:{srv.port}/1", tmp / "stack")
        strip_settings(st.env)
        st.env["WORKER_HEARTBEAT_S"] = "1"  # as every bench stack (Stack.create): idle traffic, subtracted
        st.start_worker("echo", "w1")
        st.start_api()
        st.wait_live("echo")
        try:
            return count(st, redis.Redis(port=srv.port), n)
        finally:
            st.stop()
    finally:
        srv.stop()


def run(quick: bool) -> list[dict[str, Any]]:
    """`trifecta bench --only redisops`."""
    from client.bench import row

    res = _measure(100 if quick else 400)
    RESULTS.update(res, before=BEFORE)
    rows = []
    for k, what in (("reads_per_request", "Redis round trips (client read events)"), ("commands_per_request", "Redis commands")):
        tgt = BEFORE[k]
        rows.append(row(f"{what} per sync echo request, idle traffic subtracted (before this round's refactors: {tgt})", round(res[k], 2), round(tgt * 1.05, 2), higher_is_better=False, unit=""))
    return rows


def main() -> int:
    print(_measure(int(sys.argv[1]) if len(sys.argv) > 1 else 400))
    return 0


if __name__ == "__main__":
    sys.exit(main())
