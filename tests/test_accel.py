"""GPU paths, tested where they can be without a GPU: which providers, options and call modes
each device and setting selects (pure functions), and the IO-binding / per-shape bound-buffer
call paths run on the CPU provider against a plain `session.run` of the real textmask model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.settings import Settings
from workers import device as dv

GPU = dv.Device("cuda", 0, "0", 4)
CPU = dv.Device("cpu", 0, None, 2)
ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
CUDA_ONLY = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def names(providers: list) -> list[str]:
    return [p if isinstance(p, str) else p[0] for p in providers]


def opts(providers: list, name: str) -> dict:
    return next(p[1] for p in providers if not isinstance(p, str) and p[0] == name)


def test_cpu_device_gets_cpu_only_whatever_is_asked() -> None:
    assert dv.onnx_providers(CPU, ALL, cuda_graph=True, tensorrt=True) == ["CPUExecutionProvider"]
    plan = dv.ort_plan(CPU, ALL, Settings(ort_tensorrt=True, ort_cuda_graph=True))
    assert plan == dv.OrtPlan(["CPUExecutionProvider"], io_binding=False, cuda_graph=False)


def test_cuda_defaults_cuda_then_cpu_with_io_binding_and_no_graph() -> None:
    plan = dv.ort_plan(GPU, ALL, Settings())
    assert names(plan.providers) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    o = opts(plan.providers, "CUDAExecutionProvider")
    assert o["device_id"] == 0 and o["cudnn_conv_algo_search"] == "HEURISTIC" and "enable_cuda_graph" not in o
    assert plan.io_binding is True and plan.cuda_graph is False


def test_cuda_graph_needs_io_binding_and_fixed_shapes(caplog: pytest.LogCaptureFixture) -> None:
    on = dv.ort_plan(GPU, CUDA_ONLY, Settings(ort_cuda_graph=True))
    assert on.cuda_graph and on.io_binding and opts(on.providers, "CUDAExecutionProvider")["enable_cuda_graph"] is True
    no_bind = dv.ort_plan(GPU, CUDA_ONLY, Settings(ort_cuda_graph=True, ort_io_binding=False))
    assert not no_bind.cuda_graph and not no_bind.io_binding and "enable_cuda_graph" not in opts(no_bind.providers, "CUDAExecutionProvider")
    varying = dv.ort_plan(GPU, CUDA_ONLY, Settings(ort_cuda_graph=True), fixed_shapes=False)
    assert not varying.cuda_graph and varying.io_binding
    assert "ORT_CUDA_GRAPH needs ORT_IO_BINDING" in caplog.text


def test_tensorrt_first_with_fp16_and_an_engine_cache(tmp_path: Path) -> None:
    plan = dv.ort_plan(GPU, ALL, Settings(ort_tensorrt=True, model_dir=str(tmp_path)))
    assert names(plan.providers) == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    trt = opts(plan.providers, "TensorrtExecutionProvider")
    assert trt["trt_fp16_enable"] is True and trt["trt_engine_cache_enable"] is True
    assert trt["trt_engine_cache_path"] == str(tmp_path / ".trt-cache") == trt["trt_timing_cache_path"]
    assert "trt_cuda_graph_enable" not in trt
    fp32 = dv.ort_plan(GPU, ALL, Settings(ort_tensorrt=True, ort_trt_fp16=False, ort_trt_cache_dir="/cache", ort_cuda_graph=True))
    t = opts(fp32.providers, "TensorrtExecutionProvider")
    assert t["trt_fp16_enable"] is False and t["trt_engine_cache_path"] == "/cache" and t["trt_cuda_graph_enable"] is True


def test_tensorrt_asked_for_but_missing_falls_back_to_cuda(caplog: pytest.LogCaptureFixture) -> None:
    plan = dv.ort_plan(GPU, CUDA_ONLY, Settings(ort_tensorrt=True))
    assert names(plan.providers) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert "no TensorrtExecutionProvider" in caplog.text


def test_cpu_build_of_onnxruntime_on_a_gpu_machine_runs_on_cpu(caplog: pytest.LogCaptureFixture) -> None:
    plan = dv.ort_plan(GPU, ["CPUExecutionProvider"], Settings(ort_tensorrt=True, ort_cuda_graph=True))
    assert plan == dv.OrtPlan(["CPUExecutionProvider"], io_binding=False, cuda_graph=False)
    assert "install onnxruntime-gpu" in caplog.text


@pytest.mark.parametrize(
    ("dev", "setting", "prefer_bf16", "bf16_ok", "want"),
    [
        (CPU, "auto", True, True, "float32"),
        (GPU, "auto", True, True, "bfloat16"),
        (GPU, "auto", True, False, "float16"),  # SAM3 on a GPU without bf16
        (GPU, "auto", False, True, "float16"),  # Mask2Former, V-JEPA 2
        (GPU, "fp32", True, True, "float32"),
        (GPU, "bf16", False, True, "bfloat16"),
        (GPU, "bf16", False, False, "float16"),
        (CPU, "bf16", False, True, "bfloat16"),
        (CPU, "fp16", False, True, "float16"),
        (GPU, " FP16 ", True, True, "float16"),
    ],
)
def test_torch_dtype_selection(dev: dv.Device, setting: str, prefer_bf16: bool, bf16_ok: bool, want: str) -> None:
    assert dv.torch_dtype_name(dev, prefer_bf16=prefer_bf16, setting=setting, bf16_supported=bf16_ok) == want


def test_torch_dtype_setting_is_validated() -> None:
    with pytest.raises(ValueError):
        dv.torch_dtype_name(GPU, setting="int8")
    with pytest.raises(ValueError, match="TORCH_DTYPE"):
        Settings(torch_dtype="half")
    assert Settings(torch_dtype="BF16").torch_dtype == "bf16"


def test_torch_helpers_apply_the_selection() -> None:
    torch = pytest.importorskip("torch")
    from workers.torchopt import maybe_compile, torch_dtype

    assert torch_dtype(CPU, Settings()) is torch.float32
    assert torch_dtype(CPU, Settings(torch_dtype="bf16")) is torch.bfloat16
    net = torch.nn.Linear(2, 2)
    assert maybe_compile(net, Settings()) is False and getattr(net, "_compiled_call_impl", None) is None
    assert maybe_compile(net, Settings(image_model_compile=True)) is True and net._compiled_call_impl is not None  # compiled lazily, at the first call


# ---------------------------------------------------------------- the call paths, on the CPU provider
def test_io_binding_and_bound_buffers_give_session_run_values(model_dir: Path) -> None:
    import onnxruntime as ort

    from workers.onnxrun import OrtModel

    path = model_dir / "textmask" / "textmask.onnx"
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    m = OrtModel(str(path), CPU, Settings())
    assert m.providers() == ["CPUExecutionProvider"] and not m.io_binding and not m.cuda_graph
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((n, 3, h, w), dtype=np.float32) for n, h, w in ((1, 64, 96), (2, 64, 96), (1, 64, 96), (1, 96, 64))]
    want = [ref.run(None, {ref.get_inputs()[0].name: x})[0] for x in xs]
    for x, y in zip(xs, want, strict=True):
        np.testing.assert_allclose(m.run(x), y, rtol=1e-5, atol=1e-6)
    m.io_binding = True  # the CUDA code paths, with buffers in host memory (mem = "cpu")
    for x, y in zip(xs, want, strict=True):
        np.testing.assert_allclose(m.run(x), y, rtol=1e-5, atol=1e-6)
    m.cuda_graph = True  # per-shape bound buffers, updated in place: a repeated shape reuses its buffers
    m._no_graph = ort.RunOptions()
    for x, y in zip(xs, want, strict=True):
        np.testing.assert_allclose(m.run(x), y, rtol=1e-5, atol=1e-6)
    assert sorted(m._graphs) == [(1, 3, 64, 96), (1, 3, 96, 64), (2, 3, 64, 96)]
    assert m._graphs[(1, 3, 64, 96)].y.shape() == list(want[0].shape)


def test_textmask_runner_calls_the_model_through_ortmodel(model_dir: Path) -> None:
    """textmask's runner makes its model call through OrtModel (so a CUDA worker gets IO binding
    and TensorRT like the other ONNX families), with no CUDA graphs (its input shape follows the
    image); the IO-bound path gives the plain call's values on a prepared image."""
    from tests.conftest import photo
    from workers.onnxrun import OrtModel
    from workers.runners.textdet import TextDetRunner

    r = TextDetRunner("textmask", Settings(model_dir=str(model_dir), ort_cuda_graph=True), CPU)
    r.load()
    assert isinstance(r.model_call, OrtModel) and r.session is r.model_call.session
    assert r.model_call.plan.cuda_graph is False
    x = r.preprocess(np.ascontiguousarray(np.asarray(photo("chelsea.png").convert("RGB"))[..., ::-1])).x[None]
    plain = r.raw_call(x)
    r.model_call.io_binding = True  # the CUDA code path, with buffers in host memory
    np.testing.assert_array_equal(r.raw_call(x), plain)
    assert plain.shape == (1, 1, *x.shape[2:])


@pytest.mark.parametrize("spinning", [False, True])
def test_ort_spinning_sets_the_cpu_sessions_idle_threads(model_dir: Path, spinning: bool) -> None:
    """ORT_SPINNING=false (the default) makes a CPU session's idle intra-op threads sleep; true
    leaves ONNX Runtime's own default (spinning), for textmask's session as for onnxseg's."""
    from workers.runners.textdet import TextDetRunner

    r = TextDetRunner("textmask", Settings(model_dir=str(model_dir), ort_spinning=spinning), CPU)
    r.load()
    so = r.session.get_session_options()
    if spinning:
        with pytest.raises(RuntimeError, match="allow_spinning"):  # never set: ONNX Runtime's default applies
            so.get_session_config_entry("session.intra_op.allow_spinning")
    else:
        assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert Settings().ort_spinning is False
