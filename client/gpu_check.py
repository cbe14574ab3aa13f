"""`make gpu-check`: one prepared run of the bench sections that matter on an NVIDIA GPU.

    scripts/gpu_check.sh                       # on the GPU machine: cuda:0, writes bench.json
    scripts/gpu_check.sh --dry-run             # anywhere: the same steps, tiny rounds, on the CPU

Steps, each a `trifecta bench` run in a subprocess with its own time limit (all of them under
8 minutes), their figures merged into one bench.json:

  1. what the machine has: GPU (nvidia-smi), torch and CUDA, onnxruntime and its providers,
     and the providers/options/call mode `workers/device.py` picks for an ONNX model on cuda:0
  2. torch families (`--only torch --device cuda:0`): SAM3, Mask2Former, V-JEPA 2 tiny
     checkpoints, batch 1/4/8, fp32 vs bf16, model vs end-to-end
  3. the pipeline (`--quick --only dispatch,simulated`): echo round trips and what one worker
     feeds a simulated device; the host's CPU is what these measure
  4. textmask on the device with ORT_DEVICE_PREPROCESS on and off (in-process): the same
     regions on the test photos, and the time per image of each path

A step that fails or runs out of time is recorded with its output tail, and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 470  # under 8 minutes in all


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "device_asked": device}
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        info["nvidia_smi"] = f"not available ({type(e).__name__})"
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["cuda"] = torch.version.cuda
            info["gpu"] = torch.cuda.get_device_name(0)
            info["bf16"] = torch.cuda.is_bf16_supported()
    except ImportError as e:
        info["torch"] = f"missing ({e})"
    try:
        import onnxruntime as ort

        from tasks.settings import Settings
        from workers.device import Device, ort_plan

        avail = ort.get_available_providers()
        info["onnxruntime"] = ort.__version__
        info["onnxruntime_providers"] = avail
        plan = ort_plan(Device("cuda", 0, "0", 4), avail, Settings())
        info["onnx_plan_cuda0"] = {"providers": plan.providers, "io_binding": plan.io_binding, "cuda_graph": plan.cuda_graph}
        if "CUDAExecutionProvider" not in avail:
            info["onnx_note"] = "the CPU build of onnxruntime: ONNX models (textmask) would run on the CPU; install onnxruntime-gpu to measure them on the GPU"
    except ImportError as e:
        info["onnxruntime"] = f"missing ({e})"
    return info


def textmask_paths(device: str, rounds: int = 5) -> dict[str, Any]:
    """textmask's runner on `device` with its resize and normalisation on the host and on the
    device (workers/devprep.py): regions per photo, the largest corner difference, ms per image."""
    import numpy as np

    from tasks.settings import Settings
    from workers.device import pin
    from workers.runners.base import Item
    from workers.runners.textdet import TextDetRunner

    try:
        dev = pin(device)
        photos = [p.read_bytes() for p in sorted((ROOT / "tests" / "data" / "images").glob("*.png"))]
        req = type("Req", (), {"params": None})()
        out: dict[str, Any] = {"device": str(dev)}
        regions: dict[str, list] = {}
        for mode in ("off", "on"):
            r = TextDetRunner("textmask", Settings(model_dir=str(ROOT / "models"), ort_device_preprocess=mode), dev)
            r.load()
            r.warmup()
            items = [Item(req, d) for d in photos]
            regions[mode] = [res.meta["regions"] for res in r.run_batch(items)]
            t0 = time.perf_counter()
            for _ in range(rounds):
                r.run_batch(items)
            out[f"ms_per_image_preprocess_{'device' if mode == 'on' else 'host'}"] = round((time.perf_counter() - t0) / (rounds * len(items)) * 1000, 2)
            out["providers"] = r.session.get_providers()
        out["regions_per_photo"] = [len(x) for x in regions["off"]]
        out["same_region_counts"] = [len(x) for x in regions["off"]] == [len(x) for x in regions["on"]]
        diffs = [float(np.abs(np.asarray(a["points"]) - np.asarray(b["points"])).max()) for xs, ys in zip(regions["off"], regions["on"], strict=True) if len(xs) == len(ys) for a, b in zip(xs, ys, strict=True)]
        out["max_corner_px"] = max(diffs, default=0.0)
        return out
    except ImportError as e:  # a machine carrying the wheelhouse has no OpenCV (see docs/performance.md)
        return {"skipped": f"textmask cannot load here: {e}"}
    except Exception as e:  # noqa: BLE001 - recorded; the other steps still run
        return {"error": f"{type(e).__name__}: {e}"}


def step(name: str, args: list[str], timeout: float, env: dict[str, str]) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix=f"gpu-check-{name}-")) / "bench.json"
    cmd = [sys.executable, "-m", "client.cli", "bench", *args, "--output", str(out)]
    t0 = time.time()
    print(f"[gpu-check] {name}: {' '.join(cmd[2:])} (limit {timeout:.0f} s)", flush=True)
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, tail = r.returncode, (r.stdout + r.stderr)[-4000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""))[-4000:]
    res: dict[str, Any] = {"command": " ".join(cmd[2:]), "rc": rc, "seconds": round(time.time() - t0, 1)}
    if out.exists():
        res["bench"] = json.loads(out.read_text())
    else:
        res["output_tail"] = tail
    print(f"[gpu-check] {name}: rc={rc} in {res['seconds']} s", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--dry-run", action="store_true", help="tiny rounds on the CPU: checks the steps work on a machine without a GPU")
    ap.add_argument("--output", default="bench.json")
    a = ap.parse_args(argv)
    device = "cpu" if a.dry_run else a.device
    t_start = time.time()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
    if a.dry_run:
        env["TRIFECTA_BENCH_DRY"] = "1"
    report: dict[str, Any] = {
        "kind": "gpu-check" + (" (dry run on the CPU)" if a.dry_run else ""),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(device),
        "steps": {},
    }
    plan = [
        ("torch", ["--only", "torch", "--device", device] + (["--quick"] if a.dry_run else []), 260.0),
        ("pipeline", ["--quick", "--only", "simulated" if a.dry_run else "dispatch,simulated"], 170.0),
    ]
    goals: list[dict[str, Any]] = []
    for name, args, limit in plan:
        left = TOTAL_BUDGET_S - (time.time() - t_start)
        if left < 30:
            report["steps"][name] = {"skipped": f"out of time ({left:.0f} s left of {TOTAL_BUDGET_S})"}
            continue
        res = step(name, args, min(limit, left), env)
        report["steps"][name] = res
        goals += res.get("bench", {}).get("goals", [])
    report["goals"] = goals
    print(f"[gpu-check] textmask on {device}, preprocessing on the host vs on the device", flush=True)
    report["steps"]["textmask_preprocess"] = textmask_paths(device, 1 if a.dry_run else 5)
    report["seconds"] = round(time.time() - t_start, 1)
    Path(a.output).write_text(json.dumps(report, indent=2, default=str))
    ok = all(isinstance(s, dict) and s.get("rc") in (0, 1) and "bench" in s for k, s in report["steps"].items() if k != "textmask_preprocess")
    ok = ok and "error" not in report["steps"]["textmask_preprocess"]
    print(f"[gpu-check] wrote {a.output} in {report['seconds']} s: {'all steps ran' if ok else 'a step failed (see its output_tail)'}", flush=True)
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
