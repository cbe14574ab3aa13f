"""`trifecta bench --only textmask`: the service against what a user would otherwise run.

Per input (four real photos, see `inputs`), in rounds that alternate the sides so a shared
host's load weighs on all of them alike, medians reported:

    raw      a DEFAULT `onnxruntime.InferenceSession(model_path)` (no session options, ONNX
             Runtime's own threads) calling the model on the tensor the service prepares for
             that image, in a loop: the model alone, nothing else
    naive    the one-process script a user would write: RapidOCR 1.4.4's own `TextDetector`
             (the reference pipeline textmask matches) on the image decoded by RapidOCR's
             `LoadImage` from the same bytes, long side above 2000 scaled down as RapidOCR
             does, the quadrilaterals filled into a mask, packbits-encoded; in a loop
    service  `POST /run_textmask` with the same bytes at concurrency 8 and 16, the service on
             its DEFAULT settings (every Trifecta variable of this environment is removed)

CPU per image: the service's API, worker and Redis processes (client/cpuacct.py, utime+stime
over the saturated run) against the naive loop's own process CPU over its run. The bench's
load generator is not counted (it runs in this process, but not during the naive rounds).
"""

from __future__ import annotations

import io
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from client.cpuacct import CpuMeter

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "tests" / "data" / "images"
CONCURRENCY = (8, 16)
MIN_RAW_SIDE = 512  # the service / raw goal holds for inputs this size and above


def inputs() -> list[dict[str, Any]]:
    """The four inputs: two photos as they are, two real photos enlarged with Pillow's LANCZOS
    filter and saved as JPEG quality 90 (made afresh at every run, so the bench needs no big files)."""
    from PIL import Image

    def jpeg(name: str, size: tuple[int, int]) -> bytes:
        bio = io.BytesIO()
        Image.open(IMAGES / name).convert("RGB").resize(size, Image.LANCZOS).save(bio, format="JPEG", quality=90)
        return bio.getvalue()

    return [
        {"name": "451x300 PNG", "source": "chelsea.png", "size": (451, 300), "ctype": "image/png", "data": (IMAGES / "chelsea.png").read_bytes()},
        {"name": "512x512 PNG", "source": "astronaut.png", "size": (512, 512), "ctype": "image/png", "data": (IMAGES / "astronaut.png").read_bytes()},
        {"name": "1024x768 JPEG", "source": "rocket.jpg enlarged (LANCZOS), JPEG q90", "size": (1024, 768), "ctype": "image/jpeg", "data": jpeg("rocket.jpg", (1024, 768))},
        {"name": "2048x1536 JPEG", "source": "coffee.png enlarged (LANCZOS), JPEG q90", "size": (2048, 1536), "ctype": "image/jpeg", "data": jpeg("coffee.png", (2048, 1536))},
    ]


# ---------------------------------------------------------------- the service's own tensor
def service_runner(threads: int) -> Any:
    """The textmask worker's runner in this process, used only to prepare tensors exactly as the
    worker does (and, in a row of its own, to time the worker's session options)."""
    from tasks.models import MODELS
    from tasks.settings import Settings
    from workers.device import Device
    from workers.runners.base import runner_class

    r = runner_class(MODELS["textmask"].family)("textmask", Settings(model_dir=str(ROOT / "models")), Device("cpu", 0, None, threads))
    r.load()
    r.warmup()
    return r


def prepare_tensor(runner: Any, data: bytes) -> np.ndarray:
    """1 x C x H x W: the input the worker gives the model for these bytes (the runner's own prepare)."""
    from workers.runners.base import Item

    return runner.prepare(Item(req=None, data=data)).x[None]  # type: ignore[arg-type]  # prepare reads only the bytes


def model_path() -> str:
    from tasks.settings import Settings
    from workers.runners.onnxseg import locate_files

    return str(locate_files("textmask", Settings(model_dir=str(ROOT / "models")))[0])


# ---------------------------------------------------------------- baselines
def loop(fn: Any, seconds: float, min_n: int = 3) -> dict[str, float]:
    """Call fn() for `seconds` (at least min_n times): images/s and this process's CPU per call."""
    meter = CpuMeter({"self": os.getpid()}).start()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < min_n:
        fn()
        n += 1
    dt = time.perf_counter() - t0
    cpu = meter.stop()["self"]
    return {"rate": n / dt, "call_ms": dt / n * 1000, "cpu_ms": cpu / n * 1000, "n": n}


class Naive:
    """The one-process script: RapidOCR's TextDetector as a user would call it."""

    def __init__(self) -> None:
        from rapidocr_onnxruntime.ch_ppocr_det import TextDetector
        from rapidocr_onnxruntime.main import DEFAULT_CFG_PATH
        from rapidocr_onnxruntime.utils import LoadImage, read_yaml, reduce_max_side, update_model_path

        cfg = update_model_path(read_yaml(DEFAULT_CFG_PATH))
        self.max_side = int(cfg["Global"]["max_side_len"])
        self.det = TextDetector(cfg["Det"])  # RapidOCR's own session options and threads
        self.load_image = LoadImage()
        self.reduce_max_side = reduce_max_side

    def tensor_shape(self, data: bytes) -> list[int]:
        """The model input RapidOCR makes of these bytes (C x H x W), to check the service's is the same size."""
        img = self.load_image(data)
        if max(img.shape[:2]) > self.max_side:
            img = self.reduce_max_side(img, self.max_side)[0]
        x = self.det.get_preprocess(max(img.shape[:2]))(img)
        return [] if x is None else list(x.shape[1:])

    def __call__(self, data: bytes) -> bytes:
        import cv2

        from storage.codecs import encode_packbits

        img = self.load_image(data)
        h, w = img.shape[:2]
        rh = rw = 1.0
        if max(h, w) > self.max_side:
            img, rh, rw = self.reduce_max_side(img, self.max_side)
        boxes, _ = self.det(img)
        mask = np.zeros((h, w), np.uint8)
        if boxes is not None and len(boxes):
            quads = np.round(np.asarray(boxes, np.float32) * np.float32([rw, rh])).astype(np.int32)
            cv2.fillPoly(mask, list(quads.reshape(-1, 4, 1, 2)), 1)
        return encode_packbits(mask.view(bool))


def naive_or_reason() -> tuple[Naive | None, str]:
    try:
        return Naive(), ""
    except ImportError as e:
        return None, f"rapidocr_onnxruntime is not installed ({e}); pip install 'rapidocr_onnxruntime==1.4.4' (a dev dependency) for the naive rows"


# ---------------------------------------------------------------- the section
def sec_textmask(env: Any, quick: bool, out: dict[str, Any]) -> list[dict[str, Any]]:
    import onnxruntime as ort

    from client.bench import cores, load

    threads = cores()
    secs = 3.0 if quick else 6.0
    rounds = 1 if quick else 3
    ours = service_runner(threads)
    default = ort.InferenceSession(model_path())  # ONNX Runtime's defaults: no options at all
    in_name = default.get_inputs()[0].name
    naive, why = naive_or_reason()
    if naive is None:
        print(f"[bench] textmask: naive rows skipped: {why}", flush=True)
    st = env.stack(["textmask"], defaults=True)
    pids = {"api": st.api.p.pid, "worker": st.workers[0].p.pid, "redis": env.redis.proc.pid}
    rows: list[dict[str, Any]] = []
    res: dict[str, Any] = {"threads": threads, "rounds": rounds, "seconds": secs, "service_settings": "defaults", "naive": "rapidocr_onnxruntime TextDetector" if naive else why, "inputs": {}}
    try:
        for inp in inputs():
            data, name = inp["data"], inp["name"]
            x = prepare_tensor(ours, data)
            load(st.url, "/run_textmask", data, 4, total=8, headers={"Content-Type": inp["ctype"]})  # warm
            if naive:
                naive(data)
            per: dict[str, list[dict[str, float]]] = {k: [] for k in ("raw", "ours", "naive", *(f"c{c}" for c in CONCURRENCY))}
            for _ in range(rounds):  # alternated: raw, naive, service c8, service c16, our session
                per["raw"].append(loop(lambda x=x: default.run(None, {in_name: x}), secs))
                if naive:
                    per["naive"].append(loop(lambda data=data: naive(data), secs))
                for c in CONCURRENCY:
                    meter = CpuMeter(pids).start()
                    r = load(st.url, "/run_textmask", data, c, duration=secs, headers={"Content-Type": inp["ctype"]})
                    cpu = meter.stop()
                    n = max(1, r.ok)
                    per[f"c{c}"].append(
                        {
                            "rate": r.rate(),
                            "p50_ms": r.pct(50) * 1000,
                            "p99_ms": r.pct(99) * 1000,
                            "ok": r.ok,
                            "errors": sum(v for k, v in r.statuses.items() if k != 200) + r.errors,
                            **{f"cpu_ms_{k}": v / n * 1000 for k, v in cpu.items()},
                            "cpu_ms": sum(cpu.values()) / n * 1000,
                        }
                    )
                per["ours"].append(loop(lambda x=x: ours.raw_call(x), secs))
            med = {k: {f: statistics.median(m[f] for m in v) for f in v[0]} for k, v in per.items() if v}
            naive_tensor = naive.tensor_shape(data) if naive else None
            like = naive_tensor is None or naive_tensor == list(x.shape[1:])
            if not like:
                print(f"[bench] textmask {name}: NOT like for like: the service's model input is {list(x.shape[1:])}, RapidOCR's is {naive_tensor}", flush=True)
            res["inputs"][name] = {"source": inp["source"], "bytes": len(data), "tensor": list(x.shape[1:]), "naive_tensor": naive_tensor, "like_for_like": like, "median": med, "rounds": per}
            rows += goal_rows(name, inp["size"], med, {"service_input": list(x.shape[1:]), "naive_input": naive_tensor})
    finally:
        st.stop()
    out["textmask"] = res
    return rows


def goal_rows(name: str, size: tuple[int, int], med: dict[str, dict[str, float]], shapes: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    from client.bench import row

    rows = []
    raw = med["raw"]
    for c in CONCURRENCY:
        s = med[f"c{c}"]
        where = {k.removeprefix("cpu_ms_"): round(v, 2) for k, v in s.items() if k.startswith("cpu_ms_")}
        if "naive" in med:
            nv = med["naive"]
            rows.append(row(f"textmask {name} c={c}: service / naive images/s", s["rate"] / nv["rate"], 0.9, service=s["rate"], naive=nv["rate"], **(shapes or {})))
            rows.append(
                row(
                    f"textmask {name} c={c}: service / naive CPU per image",
                    s["cpu_ms"] / nv["cpu_ms"],
                    1.1,
                    higher_is_better=False,
                    service_cpu_ms=s["cpu_ms"],
                    naive_cpu_ms=nv["cpu_ms"],
                    service_cpu_ms_by_process=where,
                )
            )
        if min(size) >= MIN_RAW_SIDE:
            rows.append(row(f"textmask {name} c={c}: service / raw (default ORT session) images/s", s["rate"] / raw["rate"], 0.8, service=s["rate"], raw=raw["rate"]))
        else:
            rows.append(row(f"textmask {name} c={c}: service / raw (default ORT session) images/s, reported", s["rate"] / raw["rate"], 1e9, higher_is_better=False, service=s["rate"], raw=raw["rate"]))
    o = med["ours"]
    rows.append(
        row(
            f"textmask {name}: worker's session options / ORT defaults, model calls/s, reported",
            o["rate"] / raw["rate"],
            1e9,
            higher_is_better=False,
            ours_call_ms=o["call_ms"],
            default_call_ms=raw["call_ms"],
        )
    )
    return rows
