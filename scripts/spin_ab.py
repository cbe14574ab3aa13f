"""The ORT_SPINNING measurement behind its default (docs/performance.md): two textmask stacks, idle
ONNX Runtime threads sleeping vs spinning, in alternated rounds; images/s and CPU per image (API +
worker + Redis, from /proc) per input and concurrency, medians.

    .venv/bin/python scripts/spin_ab.py [ROUNDS]      # default 3 rounds of 6 s per side
"""

from __future__ import annotations

import statistics
import sys

from client.bench import Env, load
from client.bench_textmask import inputs
from client.cpuacct import CpuMeter

SECONDS = 6


def main() -> int:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    env = Env()
    sts = {f: env.stack(["textmask"], {"ORT_SPINNING": f}, defaults=True) for f in ("false", "true")}
    res: dict[tuple[str, int, str], list[float]] = {}
    try:
        ins = [i for i in inputs() if i["name"] in ("451x300 PNG", "512x512 PNG", "1024x768 JPEG")]
        for inp in ins:
            for st in sts.values():
                load(st.url, "/run_textmask", inp["data"], 4, total=8, headers={"Content-Type": inp["ctype"]})  # warm
        for rnd in range(rounds):
            for inp in ins:
                for c in (8, 16):
                    order = list(sts.items()) if rnd % 2 == 0 else list(sts.items())[::-1]
                    for f, st in order:
                        m = CpuMeter({"api": st.api.p.pid, "worker": st.workers[0].p.pid, "redis": env.redis.proc.pid}).start()
                        r = load(st.url, "/run_textmask", inp["data"], c, duration=SECONDS, headers={"Content-Type": inp["ctype"]})
                        used = sum(m.stop().values())
                        res.setdefault((inp["name"], c, f), []).append(r.rate())
                        res.setdefault((inp["name"], c, f + "_cpu"), []).append(used * 1000 / max(len(r.latencies), 1))
    finally:
        for st in sts.values():
            st.stop()
        env.close()
    for name, c in sorted({(a, b) for a, b, _ in res}):
        off, on = (statistics.median(res[(name, c, f)]) for f in ("false", "true"))
        coff, con = (statistics.median(res[(name, c, f + "_cpu")]) for f in ("false", "true"))
        print(f"{name} c={c}: images/s sleep {off:.3f} spin {on:.3f} spin/sleep {on / off:.3f} | CPU ms/image sleep {coff:.1f} spin {con:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
