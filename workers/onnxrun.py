"""One ONNX model call, made the way the device wants it (plan from workers/device.py `ort_plan`).

    model = OrtModel(path, device, settings, session_options)
    y = model.run(x)          # x: N x C x H x W float32 numpy → the first output, numpy

CPU: `session.run`. CUDA with ORT_IO_BINDING: the input is bound from host memory and the
output is allocated on the GPU by ONNX Runtime and copied back once (no per-call numpy
round trip of outputs the caller does not read). CUDA with ORT_CUDA_GRAPH as well: per input
shape, device buffers are allocated once, bound, and the first run captures a CUDA graph
that later runs replay (ONNX Runtime's `gpu_graph_id` run option keeps one graph per shape);
the input is copied into the bound buffer in place. Shapes beyond MAX_GRAPHS run with plain
IO binding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.device import Device, OrtPlan, ort_plan

log = logging.getLogger("trifecta.onnxrun")

MAX_GRAPHS = 16  # one per batch size up to MAX_BATCH_SIZE for a fixed-size model; a few shapes otherwise


@dataclass
class _Bound:
    binding: Any
    x: Any  # OrtValue on the device, the graph's input buffer
    y: Any  # OrtValue on the device, the graph's output buffer
    run_options: Any


class OrtModel:
    def __init__(self, path: str | bytes, device: Device, settings: Any, sess_options: Any = None, fixed_shapes: bool = True, input_name: str | None = None, output_name: str | None = None) -> None:
        import onnxruntime as ort

        self.ort = ort
        avail = ort.get_available_providers()
        self.plan: OrtPlan = ort_plan(device, avail, settings, fixed_shapes=fixed_shapes)
        try:
            self.session = ort.InferenceSession(path if isinstance(path, bytes) else str(path), sess_options=sess_options, providers=self.plan.providers)
        except Exception as e:  # noqa: BLE001 - ONNX Runtime refuses CUDA graphs when any node falls back to the CPU
            if not self.plan.cuda_graph:
                raise
            log.warning("ORT_CUDA_GRAPH refused for %s (%s); running without CUDA graphs", path, e)
            self.plan = ort_plan(device, avail, settings, fixed_shapes=False)
            self.session = ort.InferenceSession(path if isinstance(path, bytes) else str(path), sess_options=sess_options, providers=self.plan.providers)
        names_in = [i.name for i in self.session.get_inputs()]
        names_out = [o.name for o in self.session.get_outputs()]
        self.input_name = input_name if input_name in names_in else names_in[0]
        self.output_name = output_name if output_name in names_out else names_out[0]
        running = self.session.get_providers()
        self.on_gpu = running[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        # the device where IO-bound buffers live ("cpu" keeps the same code path testable without a GPU)
        self.mem = "cuda" if self.on_gpu else "cpu"
        self.io_binding = self.plan.io_binding and self.on_gpu
        self.cuda_graph = self.plan.cuda_graph and self.on_gpu
        self._graphs: dict[tuple[int, ...], _Bound] = {}
        self._no_graph = None
        if self.cuda_graph:  # runs outside a captured shape must say so: the default id (0) would be captured
            self._no_graph = ort.RunOptions()
            self._no_graph.add_run_config_entry("gpu_graph_id", "-1")

    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def run(self, x: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """`extra`: the graph's other inputs, small host arrays (textmask's target size with
        ORT_DEVICE_PREPROCESS); such calls are not captured as CUDA graphs."""
        if self.cuda_graph and not extra:
            return self._run_graph(x)
        if self.io_binding:
            return self._run_bound(x, extra)
        return self.session.run([self.output_name], {self.input_name: x, **(extra or {})}, self._no_graph)[0]

    def _run_bound(self, x: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> np.ndarray:
        b = self.session.io_binding()
        b.bind_cpu_input(self.input_name, np.ascontiguousarray(x))
        for name, v in (extra or {}).items():
            b.bind_cpu_input(name, np.ascontiguousarray(v))
        b.bind_output(self.output_name, self.mem)
        self.session.run_with_iobinding(b, self._no_graph)
        return b.copy_outputs_to_cpu()[0]

    def _run_graph(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        g = self._graphs.get(x.shape)
        if g is None:
            if len(self._graphs) >= MAX_GRAPHS:
                return self._run_bound(x)
            g = self._graphs[x.shape] = self._capture(x)
            return g.y.numpy()  # the capturing run has already computed this input's output
        g.x.update_inplace(x)
        self.session.run_with_iobinding(g.binding, g.run_options)
        return g.y.numpy()

    def _capture(self, x: np.ndarray) -> _Bound:
        ort = self.ort
        y_shape = self.session.run([self.output_name], {self.input_name: x}, self._no_graph)[0].shape  # plain run, not captured: the output's shape
        xv = ort.OrtValue.ortvalue_from_numpy(x, self.mem, 0)
        yv = ort.OrtValue.ortvalue_from_shape_and_type(list(y_shape), np.float32, self.mem, 0)
        b = self.session.io_binding()
        b.bind_ortvalue_input(self.input_name, xv)
        b.bind_ortvalue_output(self.output_name, yv)
        ro = ort.RunOptions()
        # one graph per shape: ids from 1 (0 is ONNX Runtime's default, -1 means "do not capture");
        # ORT does not check that a replayed id sees the shape it captured, the dict key does
        ro.add_run_config_entry("gpu_graph_id", str(len(self._graphs) + 1))
        self.session.run_with_iobinding(b, ro)  # ORT's warm-up runs, then the capture; each computes y
        self.session.run_with_iobinding(b, ro)
        log.info("captured a CUDA graph for input %s (graph %d)", x.shape, len(self._graphs) + 1)
        return _Bound(b, xv, yv, ro)
