"""Device pinning and provider selection, done before any CUDA library is imported.

One worker process per device. `pin(device)` sets CUDA_VISIBLE_DEVICES so the process
sees exactly its GPU as cuda:0, respecting a value the operator already set (then
`cuda:N` means the N-th device of that list, as BentoML does). Nothing here imports
torch or onnxruntime: the caller passes in what the runtime reports.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass

log = logging.getLogger("trifecta.device")


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" | "cuda"
    index: int  # index as the operator named it (cuda:N); 0 for cpu
    physical: str | None  # the CUDA_VISIBLE_DEVICES entry this process was pinned to
    threads: int  # intra-op threads

    @property
    def local(self) -> str:
        """What frameworks inside this process call the device (cuda:0 after pinning)."""
        return "cuda:0" if self.kind == "cuda" else "cpu"

    def __str__(self) -> str:
        return f"cuda:{self.index}" if self.kind == "cuda" else "cpu"


def parse(device: str) -> tuple[str, int]:
    d = device.strip().lower()
    if d == "cpu":
        return "cpu", 0
    if d == "cuda":
        return "cuda", 0
    if d.startswith("cuda:") and d[5:].isdigit():
        return "cuda", int(d[5:])
    raise ValueError(f"--device must be cpu or cuda:N, got {device!r}")


def gpu_present() -> bool:
    """A cheap look for an NVIDIA GPU without loading CUDA."""
    return os.path.exists("/dev/nvidia0") or (shutil.which("nvidia-smi") is not None and os.path.exists("/proc/driver/nvidia"))


def cores_owned() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def pin(device: str, *, use_cuda: bool = True, threads: int = 0, env: dict[str, str] | None = None, has_gpu: bool | None = None) -> Device:
    """Pin this process to `device` by editing `env` (os.environ by default)."""
    env = os.environ if env is None else env
    kind, index = parse(device)
    n_threads = threads or cores_owned()
    if kind == "cuda":
        present = gpu_present() if has_gpu is None else has_gpu
        if not use_cuda or not present:
            log.warning("device %s asked for but %s: falling back to CPU", device, "USE_CUDA=false" if not use_cuda else "no GPU is present")
            env["CUDA_VISIBLE_DEVICES"] = ""
            return Device("cpu", 0, None, n_threads)
        visible = env.get("CUDA_VISIBLE_DEVICES")
        if visible:
            listed = [v.strip() for v in visible.split(",") if v.strip()]
            if index >= len(listed):
                raise ValueError(f"--device cuda:{index} but CUDA_VISIBLE_DEVICES={visible!r} lists only {len(listed)} device(s)")
            physical = listed[index]
        else:
            physical = str(index)
        env["CUDA_VISIBLE_DEVICES"] = physical
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        # a GPU worker needs few CPU threads: pre/post-processing only
        return Device("cuda", index, physical, threads or min(n_threads, 4))
    env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU worker must not grab a GPU by accident
    return Device("cpu", 0, None, n_threads)


def keep_big_buffers(mmap_threshold: int = 256 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Let glibc serve large buffers (a 2048x2048 input tensor is 48 MB) from its heap and keep
    them after free, instead of mmap/munmap per request: every fresh mmap'd buffer page-faults
    on first touch, and two threads faulting at once made preprocessing a 2048x2048 image
    3-10x slower on this VM (measured 17-110 ms vs 10-13 ms with this). The cost is that up to
    `trim_threshold` of freed memory stays in the worker's RSS. No-op off glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, mmap_threshold)) and bool(libc.mallopt(-1, trim_threshold))  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


@dataclass(frozen=True)
class OrtPlan:
    """How an ONNX model runs on a device: the providers (with their options) handed to
    `InferenceSession`, and how calls are made (workers/onnxrun.py)."""

    providers: list[str | tuple[str, dict]]
    io_binding: bool  # inputs bound from host memory, outputs kept on the device until copied once
    cuda_graph: bool  # one captured CUDA graph per input shape (fixed shapes only), replayed per call


def onnx_providers(
    dev: Device,
    available: list[str],
    *,
    cuda_graph: bool = False,
    tensorrt: bool = False,
    trt_fp16: bool = True,
    trt_cache_dir: str | None = None,
) -> list[str | tuple[str, dict]]:
    """ONNX Runtime providers for a pinned device, most preferred first.

    CPU device: CPU only. CUDA device: TensorRT (when asked for and onnxruntime-gpu has it;
    fp16 engines with ORT_TRT_FP16, engines cached in `trt_cache_dir` because building one
    takes minutes), then CUDA (nodes TensorRT cannot take), then CPU. A CUDA provider that is
    missing (the CPU build of onnxruntime) falls back to CPU with a warning."""
    if dev.kind != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        log.warning("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu); running on CPU")
        return ["CPUExecutionProvider"]
    cuda: dict[str, object] = {"device_id": 0, "cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": True}
    if cuda_graph:
        cuda["enable_cuda_graph"] = True
    out: list[str | tuple[str, dict]] = []
    if tensorrt:
        if "TensorrtExecutionProvider" in available:
            trt: dict[str, object] = {"device_id": 0, "trt_fp16_enable": bool(trt_fp16)}
            if trt_cache_dir:
                trt.update(trt_engine_cache_enable=True, trt_engine_cache_path=trt_cache_dir, trt_timing_cache_enable=True, trt_timing_cache_path=trt_cache_dir)
            if cuda_graph:
                trt["trt_cuda_graph_enable"] = True
            out.append(("TensorrtExecutionProvider", trt))
        else:
            log.warning("ORT_TENSORRT is on but onnxruntime has no TensorrtExecutionProvider (onnxruntime-gpu with TensorRT libraries); using CUDA")
    return [*out, ("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]


def ort_plan(dev: Device, available: list[str], settings: object, fixed_shapes: bool = True) -> OrtPlan:
    """The providers and the call mode from settings (ORT_IO_BINDING, ORT_CUDA_GRAPH,
    ORT_TENSORRT, ORT_TRT_FP16): IO binding and CUDA graphs only where a CUDA provider runs,
    CUDA graphs only with IO binding and for a model whose input shapes repeat."""
    g = lambda name, default: getattr(settings, name, default)  # noqa: E731
    on_cuda = dev.kind == "cuda" and "CUDAExecutionProvider" in available
    io_binding = on_cuda and bool(g("ort_io_binding", True))
    cuda_graph = io_binding and fixed_shapes and bool(g("ort_cuda_graph", False))
    if g("ort_cuda_graph", False) and on_cuda and not cuda_graph:
        log.warning("ORT_CUDA_GRAPH needs ORT_IO_BINDING and a model with fixed input shapes; running without CUDA graphs")
    cache = g("ort_trt_cache_dir", None) or os.path.join(str(g("model_dir", ".")), ".trt-cache")
    providers = onnx_providers(dev, available, cuda_graph=cuda_graph, tensorrt=bool(g("ort_tensorrt", False)), trt_fp16=bool(g("ort_trt_fp16", True)), trt_cache_dir=cache)
    return OrtPlan(providers, io_binding, cuda_graph)


TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def torch_dtype_name(dev: Device, prefer_bf16: bool = False, setting: str = "auto", bf16_supported: bool = True) -> str:
    """The torch dtype of a family's weights and activations (TORCH_DTYPE).

    auto: fp32 on a CPU; on a GPU bf16 for families that prefer it (where the GPU has bf16),
    fp16 otherwise. fp32 / fp16 / bf16: as asked, except bf16 on a GPU without it (fp16,
    with a warning)."""
    s = (setting or "auto").strip().lower()
    if s not in ("auto", *TORCH_DTYPES):
        raise ValueError(f"TORCH_DTYPE must be auto, fp32, fp16 or bf16, got {setting!r}")
    if s == "auto":
        if dev.kind != "cuda":
            return "float32"
        return "bfloat16" if prefer_bf16 and bf16_supported else "float16"
    if s == "bf16" and dev.kind == "cuda" and not bf16_supported:
        log.warning("TORCH_DTYPE=bf16 but this GPU has no bf16: using fp16")
        return "float16"
    if s == "fp16" and dev.kind != "cuda":
        log.warning("TORCH_DTYPE=fp16 on a CPU: few CPU kernels are fast in fp16 (bf16 or fp32 usually are)")
    return TORCH_DTYPES[s]


def plan_workers(models: list[str], gpu_ids: list[int], use_cuda: bool, has_gpu: bool) -> list[tuple[str, str]]:
    """(model, device) for every worker `trifecta up` starts: one per GPU per model, or one CPU worker per model."""
    if gpu_ids and use_cuda and has_gpu:
        return [(m, f"cuda:{g}") for m in models for g in gpu_ids]
    if gpu_ids and use_cuda and not has_gpu:
        log.warning("GPU_IDS=%s but no GPU is present: one CPU worker per model", ",".join(map(str, gpu_ids)))
    return [(m, "cpu") for m in models]
