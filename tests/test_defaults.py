"""First contact: `make up` / `trifecta up` with no settings serves the pretrained textmask and
the free echo model — real masks on the first request — and nothing on that path loads torch
(`make up` installs `.[worker]` only)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from client.benchkit import ROOT
from storage import codecs
from tasks.embedded_redis import free_port
from tasks.models import DEFAULT_MODELS
from tasks.settings import Settings
from tests.conftest import with_text

TEXT = ROOT / "tests" / "data" / "images" / "text.png"


def test_the_defaults_are_a_trained_model_and_echo() -> None:
    assert DEFAULT_MODELS == ("textmask", "echo")
    assert Settings.model_fields["models"].default_factory() == ["textmask", "echo"]


def _children(pid: int) -> list[int]:
    """Every descendant of `pid`, from /proc (no psutil here)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _loads_torch(pid: int) -> bool:
    """torch's shared libraries are mapped into any process that imported it."""
    maps = (Path("/proc") / str(pid) / "maps").read_text()
    return "libtorch" in maps or "/torch/lib/" in maps


def test_up_with_no_settings_serves_textmask_and_echo_without_torch(tmp_path: Path, model_dir: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MODELS", "HF_REPO_ID")}
    # REDIS_URL does not answer: `up` starts its own Redis, as on a fresh machine
    env.update(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", RUN_DIR=str(tmp_path / "run"), MODEL_DIR=str(model_dir), STORAGE_URL=f"file://{tmp_path / 'data'}", WORKER_HEARTBEAT_S="1")
    up = subprocess.Popen(
        [sys.executable, "-m", "client.cli", "up", "--port", str(port), "--no-flower"], env=env, stdout=open(tmp_path / "up.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        info: dict = {}
        t_end = time.time() + 90
        while time.time() < t_end:
            try:
                info = httpx.get(url + "/models/info", timeout=2).json()["models"]
                if info["textmask"]["live_workers"] and info["echo"]["live_workers"]:
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            assert up.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            time.sleep(0.3)
        served = sorted(m for m, v in info.items() if v["live_workers"])
        assert served == ["echo", "textmask"], (tmp_path / "up.log").read_text()[-3000:]
        assert info["textmask"]["trained"] is True and info["echo"]["trained"] is None

        # the first request gives a real mask: the text drawn on a photo, not the whole photo
        data, gt = with_text("coffee.png")
        r = httpx.post(url + "/run_textmask?format=png", content=data, headers={"Content-Type": "image/png"}, timeout=60)
        assert r.status_code == 200 and "x-model-untrained" not in r.headers
        mask = codecs.decode_png(r.content)
        assert mask.shape == gt.shape and mask.sum() > 300 and mask[gt].sum() / mask.sum() > 0.9 and mask.mean() < 0.2
        # the quick start's sample runs as well
        r = httpx.post(url + "/run_textmask?format=png", content=TEXT.read_bytes(), headers={"Content-Type": "image/png"}, timeout=60)
        assert r.status_code == 200 and codecs.decode_png(r.content).shape == (172, 448)
        e = httpx.post(url + "/run_echo", content=b"hello", timeout=30)
        assert e.status_code == 200 and e.json()["bytes"] == 5

        # no process of the default stack (up itself, its Redis, the workers, the API) has torch loaded
        procs = [up.pid, *_children(up.pid)]
        workers = [p for p in procs if " worker --model " in _cmdline(p)]
        assert len(workers) == 2 and any("--model textmask" in _cmdline(p) for p in workers) and any("--model echo" in _cmdline(p) for p in workers)
        assert any(" api " in _cmdline(p) for p in procs)
        assert [(p, _cmdline(p)) for p in procs if _loads_torch(p)] == []
    finally:
        os.killpg(up.pid, signal.SIGINT)
        up.wait(30)


def test_default_install_path_imports_no_torch(tmp_path: Path, model_dir: Path) -> None:
    """What `make up` runs before the workers start (`trifecta models fetch textmask echo`, the
    supervisor, a worker's modules and runners), in a fresh interpreter: torch never imported."""
    code = (
        "import sys\n"
        "from client.cli import main\n"
        "assert main(['models', 'fetch', 'textmask', 'echo']) == 0\n"
        "import client.supervisor, workers.main, workers.service, workers.batching, workers.broker, workers.metrics, workers.shards, tasks.celery_app, tasks.flower_app\n"
        "from workers.runners.base import runner_class\n"
        "from workers.device import pin\n"
        "from tasks.settings import get_settings\n"
        "for m in ('textmask', 'echo'):\n"
        "    r = runner_class({'textmask': 'onnxseg', 'echo': 'echo'}[m])(m, get_settings(), pin('cpu', use_cuda=False, threads=1))\n"
        "    r.load(); r.warmup()\n"
        "    assert r.trained is {'textmask': True, 'echo': None}[m], (m, r.trained)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'transformers')))\n"
    )
    env = {**os.environ, "MODEL_DIR": str(model_dir)}
    env.pop("HF_REPO_ID", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_up_says_which_models_need_torch_when_it_is_missing(tmp_path: Path) -> None:
    from client.supervisor import needs_torch

    s = Settings(models=["textmask", "echo", "sam3", "segmentation", "mask2former"], model_dir=str(tmp_path))
    assert needs_torch(s, have_torch=False) == ["sam3", "segmentation", "mask2former"]
    assert needs_torch(s, have_torch=True) == []
    assert needs_torch(Settings(models=["textmask", "echo"], model_dir=str(tmp_path)), have_torch=False) == []
    (tmp_path / "segmentation").mkdir()
    (tmp_path / "segmentation" / "segmentation.onnx").write_bytes(b"onnx")  # already exported: ONNX Runtime alone serves it
    assert needs_torch(Settings(models=["segmentation"], model_dir=str(tmp_path)), have_torch=False) == []
