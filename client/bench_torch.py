"""`trifecta bench --only torch [--device cuda:0]`: the torch families on a device, in this process.

For SAM3, Mask2Former and V-JEPA 2, each on its tiny random-init checkpoint written by the
project (`trifecta models tiny`, loaded through the production `from_pretrained` path), in
fp32 and bf16 (TORCH_DTYPE), at batch 1, 4 and 8:

    model        the runner's `predict` on prepared inputs (one model call), device synchronised
    end-to-end   the runner's `run_batch` on the request bytes: decode, preprocess, model,
                 post-process and the masks / labels (everything but the queue and HTTP)

Figures are reported (images or clips per second, and end-to-end / model); tiny checkpoints
say how much of a call is the pipeline's own work at a given batch, not a model's real speed.
The device comes from `--device` (TRIFECTA_BENCH_DEVICE); `cuda:N` without a GPU falls back to CPU.
"""

from __future__ import annotations

import io
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "tests" / "data" / "images"
FAMILIES = ("mask2former", "vjepa2", "sam3")


def row(goal: str, figure: float, **details: Any) -> dict[str, Any]:
    return {"goal": goal, "figure": round(float(figure), 3), "target": 1e9, "higher_is_better": False, "pass": True, "unit": "x", "details": details}


def _device() -> Any:
    from workers.device import Device, cores_owned

    want = os.environ.get("TRIFECTA_BENCH_DEVICE", "cpu")
    if want.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return Device("cuda", 0, "0", min(4, cores_owned()))
        print(f"[bench] torch: {want} asked for but torch sees no GPU: CPU", flush=True)
    return Device("cpu", 0, None, cores_owned())


def _request(model: str, params: dict[str, Any]) -> Any:
    from tasks.schemas import InferRequest

    now = time.time()
    return InferRequest.model_validate({"id": "0" * 32, "model": model, "input": {}, "params": params, "deadline": now + 3600, "out_prefix": "bench", "created": now})


def _inputs(family: str) -> tuple[bytes, dict[str, Any]]:
    if family == "vjepa2":
        from tasks import clips as clipc

        rng = np.random.default_rng(0)
        base = rng.integers(0, 255, (240, 240, 3), dtype=np.uint8)
        return clipc.pack_clip([np.roll(base, 4 * i, axis=1).tobytes() for i in range(16)], 240, 240, "BGR"), {"top_k": 5}
    from PIL import Image

    bio = io.BytesIO()
    Image.open(IMAGES / "coffee.png").convert("RGB").save(bio, format="JPEG", quality=90)
    params = {"prompts": [{"type": "text", "text": "cup"}]} if family == "sam3" else {}
    return bio.getvalue(), params


def _settings(family: str, ckpt: str, dtype: str) -> Any:
    from tasks.settings import Settings

    kw: dict[str, Any] = {"torch_dtype": dtype, "hf_local_files_only": True, "model_dir": str(ROOT / "models")}
    kw[{"mask2former": "m2f_checkpoint", "vjepa2": "vjepa2_checkpoint", "sam3": "sam3_checkpoint"}[family]] = ckpt
    if family == "sam3":
        kw["enable_feature_cache"] = False  # every call runs the vision encoder
    return Settings(**kw)


def _sync(dev: Any) -> None:
    if dev.kind == "cuda":
        import torch

        torch.cuda.synchronize()


def measure(family: str, ckpt: str, dtype: str, dev: Any, batches: tuple[int, ...], reps: int) -> dict[int, dict[str, float]]:
    from workers.runners.base import Item, runner_class

    runner = runner_class(family)(family, _settings(family, ckpt, dtype), dev)
    runner.load()
    runner.warmup()
    data, params = _inputs(family)
    out: dict[int, dict[str, float]] = {}
    for b in batches:
        items = [Item(_request(family, params), data) for _ in range(b)]
        prepared = [runner.prepare(it) for it in items]
        runner.predict(prepared)  # untimed: this shape's first call
        runner.run_batch(items)
        model, e2e = [], []
        for _ in range(reps):  # alternated, medians
            _sync(dev)
            t0 = time.perf_counter()
            runner.predict(prepared)
            _sync(dev)
            model.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            res = runner.run_batch(items)
            _sync(dev)
            e2e.append(time.perf_counter() - t0)
            bad = [r for r in res if not hasattr(r, "masks")]
            if bad:
                raise RuntimeError(f"{family} b{b}: {bad[0]}")
        m, e = statistics.median(model), statistics.median(e2e)
        out[b] = {"model_ms": m * 1000, "e2e_ms": e * 1000, "model_per_s": b / m, "e2e_per_s": b / e}
    del runner
    return out


def run(quick: bool) -> list[dict[str, Any]]:
    from workers.tiny import write_tiny

    dev = _device()
    dry = os.environ.get("TRIFECTA_BENCH_DRY") == "1"
    batches = (1, 2) if dry else (1, 4, 8)
    dtypes = ("fp32",) if dry else ("fp32", "bf16")
    reps = 2 if (quick or dry) else 5
    rows: list[dict[str, Any]] = []
    results: dict[str, Any] = {"device": str(dev), "batches": batches, "dtypes": dtypes, "reps": reps}
    with tempfile.TemporaryDirectory(prefix="trifecta-bench-torch-") as tmp:
        for family in FAMILIES:
            ckpt = write_tiny(family, str(Path(tmp) / family))
            results[family] = {}
            for dt in dtypes:
                t0 = time.time()
                try:
                    r = measure(family, ckpt, dt, dev, batches, reps)
                except Exception as e:  # noqa: BLE001 - one family failing is reported, the others still run
                    results[family][dt] = {"error": f"{type(e).__name__}: {e}"}
                    print(f"[bench] torch {family} {dt}: {type(e).__name__}: {e}", flush=True)
                    continue
                results[family][dt] = {"per_batch": r, "seconds": round(time.time() - t0, 1)}
                for b, v in r.items():
                    rows.append(
                        row(f"torch {family} {dt} b{b} on {dev}: end-to-end / model per s, reported", v["e2e_per_s"] / v["model_per_s"], model_ms=round(v["model_ms"], 2), e2e_ms=round(v["e2e_ms"], 2))
                    )
            if "fp32" in results[family] and "bf16" in results[family] and "per_batch" in results[family]["bf16"] and "per_batch" in results[family]["fp32"]:
                b = max(batches)
                f32, bf = results[family]["fp32"]["per_batch"][b], results[family]["bf16"]["per_batch"][b]
                rows.append(
                    row(f"torch {family} b{b} on {dev}: bf16 / fp32 model per s, reported", bf["model_per_s"] / f32["model_per_s"], fp32_ms=round(f32["model_ms"], 2), bf16_ms=round(bf["model_ms"], 2))
                )
    RESULTS.clear()
    RESULTS.update(results)
    return rows


RESULTS: dict[str, Any] = {}  # the last run's figures; `trifecta bench` writes them into bench.json
