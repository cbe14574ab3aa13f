"""Textmask's resize and normalisation as ONNX nodes in front of its model, so they run on the device.

On an accelerator the host's CPU is what limits how many images/s one worker feeds a device
(`trifecta bench --only simulated`). With ORT_DEVICE_PREPROCESS the textmask worker sends the
decoded uint8 image (after RapidOCR's own scaling and padding, which stay on the host) and the
size the detector wants; the graph does the rest where the model runs:

    image  N x H x W x 3 uint8 (BGR)    size  int64 [N, th, tw, 3]
      Cast(float) → Resize(linear, half_pixel: cv2.resize's INTER_LINEAR) → Round (cv2 gives uint8)
      → Transpose(NCHW) → x * (1/255) → - mean → / std       (the LUT's arithmetic, same order)
      → the model

A quarter of the bytes cross to the device (uint8 at the image's own size instead of float32
at the detector's), and the host does no resize, split or lookup. The one difference from the
host path is the resize: cv2 interpolates uint8 in fixed point (11-bit weights), the graph in
float32, so a resized pixel may differ by one level. tests/test_devprep.py measures what that
does to the regions (RapidOCR parity is bit for bit on the host path, the CPU default).

Built with the `onnx` package (the `gpu` extra; the CPU default never imports it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

IMAGE = "tf_image_u8"
SIZE = "tf_size"


def with_device_preprocess(model_path: str, input_name: str, mean: list[np.float32], std: list[np.float32]) -> bytes:
    """The model at `model_path` with the preprocessing nodes in front of `input_name`; serialized."""
    import onnx
    from onnx import TensorProto, compose, helper, numpy_helper

    model = onnx.load(model_path)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 11:  # Resize with `sizes` and Round need opset 11
        raise ValueError(f"ORT_DEVICE_PREPROCESS needs an opset-11+ model; {model_path} is opset {opset}")
    c = lambda name, a: numpy_helper.from_array(np.asarray(a, np.float32).reshape(1, 3, 1, 1), name)  # noqa: E731
    inits = [
        numpy_helper.from_array(np.zeros(0, np.float32), "tf_roi"),
        numpy_helper.from_array(np.zeros(0, np.float32), "tf_scales"),
        c("tf_inv255", [np.float32(1 / 255.0)] * 3),
        c("tf_mean", mean),
        c("tf_std", std),
    ]
    out = "tf_prep_out"
    nodes = [
        helper.make_node("Cast", [IMAGE], ["tf_f"], to=TensorProto.FLOAT),
        helper.make_node("Resize", ["tf_f", "tf_roi", "tf_scales", SIZE], ["tf_r"], mode="linear", coordinate_transformation_mode="half_pixel"),
        helper.make_node("Round", ["tf_r"], ["tf_q"]),
        helper.make_node("Transpose", ["tf_q"], ["tf_chw"], perm=[0, 3, 1, 2]),
        helper.make_node("Mul", ["tf_chw", "tf_inv255"], ["tf_s"]),
        helper.make_node("Sub", ["tf_s", "tf_mean"], ["tf_c"]),
        helper.make_node("Div", ["tf_c", "tf_std"], [out]),
    ]
    graph = helper.make_graph(
        nodes,
        "trifecta_device_preprocess",
        [helper.make_tensor_value_info(IMAGE, TensorProto.UINT8, ["n", "h", "w", 3]), helper.make_tensor_value_info(SIZE, TensorProto.INT64, [4])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["n", 3, "th", "tw"])],
        initializer=inits,
    )
    prep = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=model.ir_version)
    merged = compose.merge_models(prep, model, io_map=[(out, input_name)])
    onnx.checker.check_model(merged)
    return merged.SerializeToString()


def wanted(setting: str, device_kind: str) -> bool:
    """ORT_DEVICE_PREPROCESS: auto = on an accelerator only (on a CPU the host's cv2 path is the
    same work, and RapidOCR's answer bit for bit); on / off as said."""
    if setting == "auto":
        return device_kind != "cpu"
    return setting == "on"


def size_input(th: int, tw: int, n: int) -> np.ndarray:
    return np.array([n, th, tw, 3], np.int64)


def stack(images: list[np.ndarray]) -> Any:
    return images[0][None] if len(images) == 1 else np.stack(images)
