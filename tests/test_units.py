"""Pure parts: device pinning and provider choice (no GPU needed), the message envelope,
settings validation, worker planning."""

from __future__ import annotations

import base64
import json

import pytest

from tasks.wire import build_message, decode_message
from workers import device as dv


def test_pin_cpu_hides_gpus_and_uses_owned_cores() -> None:
    env: dict[str, str] = {}
    d = dv.pin("cpu", env=env)
    assert env["CUDA_VISIBLE_DEVICES"] == "" and d.kind == "cpu" and d.threads == dv.cores_owned()
    assert dv.pin("cpu", threads=3, env={}).threads == 3


def test_pin_cuda_sets_visible_device_before_any_cuda_import() -> None:
    env: dict[str, str] = {}
    d = dv.pin("cuda:1", env=env, has_gpu=True)
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and d.local == "cuda:0" and str(d) == "cuda:1" and d.physical == "1"


def test_pin_cuda_respects_operator_visible_devices() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "4,6"}
    d = dv.pin("cuda:1", env=env, has_gpu=True)
    assert env["CUDA_VISIBLE_DEVICES"] == "6" and d.physical == "6"
    with pytest.raises(ValueError, match="lists only 2"):
        dv.pin("cuda:2", env={"CUDA_VISIBLE_DEVICES": "4,6"}, has_gpu=True)


def test_use_cuda_without_gpu_falls_back_to_cpu_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    env: dict[str, str] = {}
    d = dv.pin("cuda:0", env=env, has_gpu=False)
    assert d.kind == "cpu" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert "falling back to CPU" in caplog.text
    assert dv.pin("cuda:0", use_cuda=False, env={}, has_gpu=True).kind == "cpu"
    with pytest.raises(ValueError):
        dv.parse("gpu0")


def test_onnx_providers() -> None:
    gpu = dv.Device("cuda", 0, "0", 2)
    cpu = dv.Device("cpu", 0, None, 2)
    p = dv.onnx_providers(gpu, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert p[0][0] == "CUDAExecutionProvider" and p[0][1]["device_id"] == 0 and p[-1] == "CPUExecutionProvider"
    assert dv.onnx_providers(gpu, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert dv.onnx_providers(cpu, ["CUDAExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert dv.torch_dtype_name(gpu) == "float16" and dv.torch_dtype_name(gpu, prefer_bf16=True) == "bfloat16" and dv.torch_dtype_name(cpu) == "float32"


def test_plan_workers_one_per_gpu_per_model() -> None:
    assert dv.plan_workers(["textmask", "segmentation"], [0, 1], True, True) == [("textmask", "cuda:0"), ("textmask", "cuda:1"), ("segmentation", "cuda:0"), ("segmentation", "cuda:1")]
    assert dv.plan_workers(["textmask"], [0, 1], True, False) == [("textmask", "cpu")]
    assert dv.plan_workers(["textmask"], [], True, True) == [("textmask", "cpu")]


def test_message_matches_celery_send_task_envelope() -> None:
    """Our hand-built envelope carries every field Celery's own producer writes."""
    from celery import Celery
    from kombu import Connection

    app = Celery("t", broker="memory://")
    app.conf.task_serializer = "json"
    captured = {}
    with Connection("memory://") as conn:
        ch = conn.default_channel
        orig = ch._put

        def grab(queue, message, **kw):  # type: ignore[no-untyped-def]
            captured["m"] = message
            return orig(queue, message, **kw)

        ch._put = grab
        app.send_task("trifecta.infer", kwargs={"req": {"a": 1}}, queue="textmask", task_id="abc", connection=conn, producer=app.amqp.Producer(ch))
    theirs = captured["m"]
    ours = json.loads(build_message("trifecta.infer", "abc", {"req": {"a": 1}}, "textmask"))
    assert set(ours) == set(theirs)
    assert set(theirs["headers"]) <= set(ours["headers"]) | {"stamped_headers", "stamps"}
    assert set(theirs["properties"]) == set(ours["properties"])
    assert ours["properties"]["delivery_info"] == {"exchange": "", "routing_key": "textmask"}
    their_body = json.loads(base64.b64decode(theirs["body"]))
    assert json.loads(base64.b64decode(ours["body"])) == their_body
    headers, kwargs = decode_message(build_message("trifecta.infer", "abc", {"req": {"a": 1}}, "textmask"))
    assert headers["task"] == "trifecta.infer" and kwargs == {"req": {"a": 1}}


def test_settings_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.settings import Settings

    monkeypatch.setenv("MODELS", "textmask, echo")
    monkeypatch.setenv("GPU_IDS", "0,1")
    s = Settings()
    assert s.models == ["textmask", "echo"] and s.gpu_ids == [0, 1]
    monkeypatch.setenv("MODELS", "textmask,bogus")
    with pytest.raises(ValueError, match="unknown model"):
        Settings()
    monkeypatch.setenv("MODELS", "textmask")
    monkeypatch.setenv("OUTPUT_FORMAT", "jpeg")
    with pytest.raises(ValueError):
        Settings()


def test_api_imports_no_heavy_libraries() -> None:
    import subprocess
    import sys

    code = "import sys, api.app, api.security; api.app.create_app(); bad=[m for m in ('torch','onnxruntime','transformers','workers','webdataset') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_batch_collector_takes_until_size_or_deadline() -> None:
    from workers.batching import take_batch

    # waits while the oldest request is younger than the timeout and the batch is not full
    assert take_batch([10.0, 10.001], now=10.002, max_size=4, timeout_s=0.004, free_slots=1) == 0
    # deadline reached: takes what is there
    assert take_batch([10.0, 10.001], now=10.0041, max_size=4, timeout_s=0.004, free_slots=1) == 2
    # full: takes max_size at once, leaves the rest
    assert take_batch([10.0] * 6, now=10.0, max_size=4, timeout_s=1, free_slots=1) == 4
    # no free slot: nothing runs, whatever is waiting
    assert take_batch([1.0] * 6, now=10.0, max_size=4, timeout_s=0.004, free_slots=0) == 0
    # timeout 0 or a freed slot (force): run now
    assert take_batch([10.0], now=10.0, max_size=4, timeout_s=0, free_slots=1) == 1
    assert take_batch([10.0, 10.0], now=10.0, max_size=4, timeout_s=1, free_slots=1, force=True) == 2
    assert take_batch([10.0], now=10.0, max_size=1, timeout_s=1, free_slots=2) == 1
    assert take_batch([], now=10.0, max_size=4, timeout_s=0, free_slots=1) == 0


def test_keep_big_buffers_sets_glibc_thresholds() -> None:
    import platform

    from workers.device import keep_big_buffers

    ok = keep_big_buffers()
    assert ok is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


def test_fetch_textmask_rewrites_an_older_config_and_keeps_the_model(model_dir, tmp_path) -> None:
    import shutil

    from workers.modelfiles import TEXTMASK_CONFIG, fetch_textmask

    d = tmp_path / "textmask"
    d.mkdir()
    shutil.copy(model_dir / "textmask" / "textmask.onnx", d / "textmask.onnx")
    old = {"input_size": 640, "head": "sigmoid", "threshold": 0.3, "resize": "letterbox", "channel_order": "BGR"}  # the onnxseg-era config
    (d / "textmask_config.json").write_text(json.dumps(old))
    before = (d / "textmask.onnx").stat().st_mtime_ns
    assert fetch_textmask(str(tmp_path)) == d / "textmask.onnx"
    assert json.loads((d / "textmask_config.json").read_text()) == TEXTMASK_CONFIG and TEXTMASK_CONFIG["family"] == "textdet"
    assert (d / "textmask.onnx").stat().st_mtime_ns == before  # the model file is not fetched again
    (d / "textmask_config.json").unlink()  # a missing config is written too
    fetch_textmask(str(tmp_path))
    assert json.loads((d / "textmask_config.json").read_text()) == TEXTMASK_CONFIG
