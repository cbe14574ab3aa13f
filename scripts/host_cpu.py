"""The host-side CPU per image of textmask's and simulated's runner hooks, in-process (no queue,
HTTP or Redis): prepare (decode, resize, normalise) and finish + packbits, thread CPU time,
median over N images. Compare two checkouts by running it from each, alternated:

    for i in 1 2 3; do for root in ../main .; do .venv/bin/python scripts/host_cpu.py $root 30; done; done

Prints one JSON line: input → {prepare_ms, finish_encode_ms}. The model is the textmask file
under <root>/models (or MODEL_DIR); simulated's prediction is its own input (no sleep)."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    sys.path.insert(0, str(root))
    os.chdir(root)
    os.environ.setdefault("MODEL_DIR", str(root / "models"))
    from client.bench_simulated import jpeg_512
    from client.bench_textmask import inputs
    from storage import codecs
    from tasks.settings import Settings
    from workers.device import Device
    from workers.runners.base import Item, runner_class

    settings = Settings()
    req = type("Req", (), {"params": None})()
    cases = [("simulated 512x512 JPEG", "simulated", jpeg_512())] + [(f"textmask {i['name']}", "textmask", i["data"]) for i in inputs()]
    runners: dict[str, object] = {}
    out = {}
    for key, model, data in cases:
        if model not in runners:
            r = runner_class({"simulated": "simulated", "textmask": "textdet"}[model])(model, settings, Device("cpu", 0, None, 2))
            r.load()
            runners[model] = r
        r = runners[model]
        it = Item(req, data)
        p0 = r.prepare(it)
        y = r.predict([p0])[0] if model == "textmask" else p0  # the model's answer once; finish is timed on it
        prep, fin = [], []
        for _ in range(n):
            t = time.thread_time()
            p = r.prepare(it)
            prep.append(time.thread_time() - t)
            t = time.thread_time()
            codecs.encode(r.finish(it, p, y if model == "textmask" else p).masks["mask"], "packbits")
            fin.append(time.thread_time() - t)
        out[key] = {"prepare_ms": round(statistics.median(prep) * 1000, 2), "finish_encode_ms": round(statistics.median(fin) * 1000, 2)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
