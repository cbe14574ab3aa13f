"""The generic ONNX segmentation runner on a SegFormer the project exports itself
(`trifecta models tiny segmentation DIR`), loaded from MODEL_DIR and through
huggingface_hub (HF_REPO_ID, from a local hub cache: no network here)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from storage import codecs
from tests.conftest import photo, png_bytes, wait_job


@pytest.fixture(scope="module")
def seg_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    subprocess.run([sys.executable, "-m", "client.cli", "models", "tiny", "segmentation", str(root / "segmentation")], check=True, capture_output=True)
    shutil.copytree(Path(__file__).resolve().parents[1] / "models" / "textmask", root / "textmask")
    return root


def _expected(seg_dir: Path, im: Image.Image) -> np.ndarray:
    """argmax != background, computed straight from onnxruntime, resized like the runner."""
    cfg = json.loads((seg_dir / "segmentation" / "segmentation_config.json").read_text())
    s = cfg["input_size"]
    a = np.asarray(im.resize((s, s), Image.BILINEAR), np.float32) / 255.0
    a = (a - np.array(cfg["mean"], np.float32)) / np.array(cfg["std"], np.float32)
    sess = ort.InferenceSession(str(seg_dir / "segmentation" / "segmentation.onnx"))
    logits = sess.run(None, {"pixel_values": a.transpose(2, 0, 1)[None].astype(np.float32)})[0][0]
    fg = logits.argmax(0) != cfg["background_class_id"]
    m = Image.fromarray(fg.astype(np.uint8) * 255).resize(im.size, Image.BILINEAR)
    return np.asarray(m) >= 128


def test_export_writes_the_source_contract(seg_dir: Path) -> None:
    cfg = json.loads((seg_dir / "segmentation" / "segmentation_config.json").read_text())
    assert set(cfg) == {"input_size", "mean", "std", "background_class_id", "input_name", "output_name"}
    src = json.loads((seg_dir / "segmentation" / "SOURCE.json").read_text())
    assert src["pretrained"] is False and "UNTRAINED" in src["source"]


def test_segmentation_worker_masks_equal_direct_model(make_stack, seg_dir: Path) -> None:
    st = make_stack(models=["segmentation"], env={"MODEL_DIR": str(seg_dir)})
    for name in ("astronaut.png", "rocket.jpg"):
        im = photo(name)
        r = httpx.post(st.url + "/run_segmentation", content=png_bytes(im), headers={"Content-Type": "image/png"}, timeout=60)
        assert r.status_code == 200, r.text
        m = codecs.decode_packbits(r.content)
        assert m.shape == (im.size[1], im.size[0])
        exp = _expected(seg_dir, im)
        assert (m == exp).mean() > 0.995
        # random-init weights: the answer says so, on the sync path and in a job's result
        assert r.headers["x-model-untrained"] == "true"
    info = httpx.get(st.url + "/models/info", timeout=5).json()["models"]
    assert info["segmentation"]["trained"] is False and info["segmentation"]["workers"][0]["trained"] is False
    assert info["echo"]["trained"] is None and info["textmask"]["trained"] is None  # not served here: nothing to say
    acc = httpx.post(st.url + "/v1/jobs", json={"model": "segmentation", "input": {"image": base64.b64encode(png_bytes(photo("coffee.png"))).decode()}}, timeout=10).json()
    job = wait_job(st.url, acc["job_id"])
    assert job["status"] == "succeeded" and job["result"]["trained"] is False
    # a tar batch through the sync endpoint: flagged as well
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w") as tf:
        data = png_bytes(photo("coffee.png"))
        ti = tarfile.TarInfo("a.png")
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    r = httpx.post(st.url + "/run_segmentation", content=bio.getvalue(), headers={"Content-Type": "application/x-tar"}, timeout=60)
    assert r.status_code == 200 and r.headers["x-batch-size"] == "1" and r.headers["x-model-untrained"] == "true"


def test_loading_through_huggingface_hub_cache(make_stack, seg_dir: Path, tmp_path: Path) -> None:
    # lay the files out exactly as huggingface_hub caches a repo, then load it offline by repo id
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--seg"
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in ("segmentation.onnx", "segmentation_config.json"):
        shutil.copy(seg_dir / "segmentation" / f, snap / f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    empty = tmp_path / "empty"
    empty.mkdir()
    st = make_stack(models=["segmentation"], env={"HF_REPO_ID": "acme/seg", "HF_LOCAL_FILES_ONLY": "true", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "MODEL_DIR": str(empty)})
    info = httpx.get(st.url + "/models/info").json()["models"]["segmentation"]
    assert info["source"] == "hf://acme/seg/segmentation.onnx" and info["revision"] == "main"
    assert info["trained"] is True  # a hub checkpoint with no SOURCE.json saying otherwise is taken as trained
    im = photo("coffee.png")
    r = httpx.post(st.url + "/run_segmentation?format=png", content=png_bytes(im), headers={"Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 200 and (codecs.decode_png(r.content) == _expected(seg_dir, im)).mean() > 0.995
    assert "x-model-untrained" not in r.headers


def test_input_size_overrides_config(make_stack, seg_dir: Path) -> None:
    st = make_stack(models=["segmentation"], env={"MODEL_DIR": str(seg_dir), "INPUT_SIZE": "96"})
    assert httpx.get(st.url + "/models/info").json()["models"]["segmentation"]["input_size"] == 96
