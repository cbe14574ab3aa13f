"""ORT_DEVICE_PREPROCESS: textmask's resize and normalisation as ONNX nodes in front of the model
(workers/devprep.py), run here on the CPU provider against the host path that matches RapidOCR.

Where the image needs no resize, the device path's model input is the host's bit for bit, so
the regions are identical; where it is resized, cv2's fixed-point bilinear and the graph's
float one may differ by a level, and the regions stay the same regions (same count, corners
within 2 px on the test photos), and a worker process running it answers sync requests the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.settings import Settings
from workers import devprep
from workers.device import Device
from workers.runners.base import Item
from workers.runners.textdet import TextDetRunner, decode_bgr

CPU = Device("cpu", 0, None, 2)
IMAGES = Path(__file__).parent / "data" / "images"
REQ = type("Req", (), {"params": None})()


@pytest.fixture(scope="module")
def runners(model_dir: Path) -> tuple[TextDetRunner, TextDetRunner]:
    out = []
    for mode in ("off", "on"):
        r = TextDetRunner("textmask", Settings(model_dir=str(model_dir), ort_device_preprocess=mode), CPU)
        r.load()
        out.append(r)
    return out[0], out[1]


@pytest.mark.parametrize(("setting", "kind", "want"), [("auto", "cpu", False), ("auto", "cuda", True), ("on", "cpu", True), ("off", "cuda", False)])
def test_the_setting_picks_where_preprocessing_runs(setting: str, kind: str, want: bool) -> None:
    assert devprep.wanted(setting, kind) is want


def test_the_cpu_default_keeps_the_host_path(model_dir: Path) -> None:
    r = TextDetRunner("textmask", Settings(model_dir=str(model_dir)), CPU)
    r.load()
    assert r.info()["preprocess"] == "host" and r.session.get_inputs()[0].type == "tensor(float)"


def test_the_device_path_sends_uint8_at_the_images_own_size(runners) -> None:
    host, dev = runners
    data = (IMAGES / "text.png").read_bytes()
    ph, pd = host.prepare(Item(REQ, data)), dev.prepare(Item(REQ, data))
    assert dev.info()["preprocess"] == "device"
    assert pd.x.dtype == np.uint8 and pd.x.shape == (172, 448, 3) and pd.size == (736, 1920)
    assert ph.x.dtype == np.float32 and ph.x.shape == (3, 736, 1920)
    assert (pd.x.nbytes, ph.x.nbytes) == (172 * 448 * 3, 3 * 736 * 1920 * 4)  # 231 KB instead of 17 MB to the device
    ins = {i.name: i.type for i in dev.session.get_inputs()}
    assert ins == {devprep.IMAGE: "tensor(uint8)", devprep.SIZE: "tensor(int64)"}


def test_no_resize_gives_the_host_paths_map_bit_for_bit(runners) -> None:
    host, dev = runners
    bgr = decode_bgr((IMAGES / "astronaut.png").read_bytes(), 10**8)
    img = np.ascontiguousarray(np.tile(bgr, (2, 2, 1))[:768, :736])  # short side 736, multiples of 32: already the detector's size
    ph, pd = host.preprocess(img), dev.preprocess(img)
    assert pd.size == tuple(ph.x.shape[1:]) == (768, 736)
    np.testing.assert_array_equal(dev.predict([pd])[0], host.predict([ph])[0])


@pytest.mark.parametrize("name", ["text.png", "chelsea.png", "coffee.png", "astronaut.png"])
def test_resized_on_the_device_the_regions_are_the_same(runners, name: str) -> None:
    host, dev = runners
    it = Item(REQ, (IMAGES / name).read_bytes())
    a, b = host.run_batch([it])[0], dev.run_batch([it])[0]
    ra, rb = a.meta["regions"], b.meta["regions"]
    assert len(ra) == len(rb)
    if name in ("text.png", "chelsea.png", "coffee.png"):
        assert ra  # photos with writing: the comparison compares something
    for x, y in zip(ra, rb, strict=True):
        assert np.abs(np.asarray(x["points"]) - np.asarray(y["points"])).max() <= 2.0
    ma, mb = a.masks["mask"], b.masks["mask"]
    assert ma.shape == mb.shape and (ma ^ mb).sum() <= 0.01 * ma.size


def test_a_batch_of_one_shape_runs_stacked_with_its_size(runners) -> None:
    """Two images of one size in one call (as a GPU worker stacks them): each gets its own map."""
    _, dev = runners
    a = dev.prepare(Item(REQ, (IMAGES / "astronaut.png").read_bytes()))
    b = dev.prepare(Item(REQ, (IMAGES / "camera.png").read_bytes()))
    y = dev.raw_call(np.stack([a.x, b.x]), a.size)
    assert y.shape == (2, 1, 736, 736)
    np.testing.assert_array_equal(y[0], dev.raw_call(a.x[None], a.size)[0])
    assert not np.array_equal(y[0], y[1])


def test_io_bound_call_with_the_size_input_gives_the_plain_calls_values(runners) -> None:
    _, dev = runners
    p = dev.prepare(Item(REQ, (IMAGES / "chelsea.png").read_bytes()))
    plain = dev.raw_call(p.x[None], p.size)
    dev.model_call.io_binding = True  # the CUDA code path, with buffers in host memory
    try:
        np.testing.assert_array_equal(dev.raw_call(p.x[None], p.size), plain)
    finally:
        dev.model_call.io_binding = False


def test_a_worker_with_device_preprocessing_answers_the_host_paths_regions(make_stack, runners) -> None:
    """Through real processes: a textmask worker with ORT_DEVICE_PREPROCESS=on (on the CPU
    provider here) answers sync requests with the regions the host path finds in-process."""
    import json

    import httpx

    from storage import codecs

    host, _ = runners
    st = make_stack(models=["textmask"], env={"ORT_DEVICE_PREPROCESS": "on"})
    info = json.loads(st.redis.hget(f"tf:worker:{st.workers[0].name}", "info"))
    assert info["preprocess"] == "device"
    for name in ("text.png", "chelsea.png"):
        data = (IMAGES / name).read_bytes()
        r = httpx.post(f"{st.url}/run_textmask?format=rle", content=data, headers={"Content-Type": "image/png"}, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        want = host.run_batch([Item(REQ, data)])[0]
        assert len(body["regions"]) == len(want.meta["regions"]) > 0
        for x, y in zip(body["regions"], want.meta["regions"], strict=True):
            assert np.abs(np.asarray(x["points"]) - np.asarray(y["points"])).max() <= 2.0
        mask = codecs.decode_rle(body)
        assert mask.shape == want.masks["mask"].shape and (mask ^ want.masks["mask"]).sum() <= 0.01 * mask.size
