"""`make gpu-check`'s dry run: the same steps as on a GPU machine, tiny rounds on the CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_machine_report_names_the_onnx_plan_for_cuda0() -> None:
    import onnxruntime as ort

    from client.gpu_check import machine

    m = machine("cuda:0")
    assert m["device_asked"] == "cuda:0" and m["onnxruntime"] == ort.__version__
    plan = m["onnx_plan_cuda0"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert plan["providers"][0][0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider") and plan["io_binding"] is True
    else:  # the CPU build: what the lent GPU machine has
        assert plan == {"providers": ["CPUExecutionProvider"], "io_binding": False, "cuda_graph": False}
        assert "onnxruntime-gpu" in m["onnx_note"]


@pytest.mark.slow
def test_dry_run_measures_every_torch_family_and_the_simulated_pipeline(tmp_path: Path, model_dir: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "PY": sys.executable}
    r = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--output", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["kind"] == "gpu-check (dry run on the CPU)"
    assert set(d["steps"]) == {"torch", "pipeline", "textmask_preprocess"}
    torch = d["steps"]["torch"]["bench"]["torch"]
    assert torch["device"] == "cpu"
    for family in ("mask2former", "vjepa2", "sam3"):
        per = torch[family]["fp32"]["per_batch"]
        assert sorted(per) == ["1", "2"], (family, torch[family])
        for v in per.values():
            assert all(math.isfinite(v[k]) and v[k] > 0 for k in ("model_ms", "e2e_ms", "model_per_s", "e2e_per_s"))
    sim = d["steps"]["pipeline"]["bench"]["simulated"]
    assert sim["device_max_images_per_s"] == pytest.approx(16 / (8 + 2 * 16) * 1000)
    for cfg in sim["configs"].values():
        assert cfg["median"]["ok"] > 0 and cfg["median"]["cpu_ms"] > 0
        assert "textmask (" in json.loads(cfg["worker_info"])["prepare"]  # textmask's own prepare ran, not the stand-in
    assert sim["bulk"]["samples"] == 600 and sim["bulk"]["median"]["rate"] > 0 and sim["bulk"]["median"]["cpu_ms_worker"] > 0
    tm = d["steps"]["textmask_preprocess"]
    assert tm["same_region_counts"] is True and 0 <= tm["max_corner_px"] <= 2.0 and sum(tm["regions_per_photo"]) > 0
    assert tm["ms_per_image_preprocess_host"] > 0 and tm["ms_per_image_preprocess_device"] > 0
    names = [g["goal"] for g in d["goals"]]
    assert sum(n.startswith("torch ") for n in names) == 6 and sum(n.startswith("simulated ") for n in names) == 6
