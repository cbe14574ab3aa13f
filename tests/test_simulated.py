"""The `simulated` model through real processes: textmask's decode and mask encoding around a
model call that sleeps SIM_BATCH_MS + SIM_IMAGE_MS x n (tests/ and `trifecta bench --only simulated`)."""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from storage import codecs
from tasks.settings import Settings
from tests.conftest import IMAGES
from workers.device import Device
from workers.runners.base import Item

SIM = {"SIM_BATCH_MS": "150", "SIM_IMAGE_MS": "5", "MAX_BATCH_SIZE": "16", "BATCH_TIMEOUT_MS": "20"}


@pytest.fixture(scope="module")
def stack(make_stack):
    return make_stack(models=["simulated"], env=SIM)


def jpeg(name: str, size: tuple[int, int]) -> bytes:
    bio = io.BytesIO()
    Image.open(IMAGES / name).convert("RGB").resize(size, Image.LANCZOS).save(bio, format="JPEG", quality=90)
    return bio.getvalue()


def reference_mask(data: bytes, model_dir) -> np.ndarray:
    """The same mask made in this process by the runner's own hooks (no sleep, no queue)."""
    from workers.runners.simulated import SimulatedRunner

    r = SimulatedRunner("simulated", Settings(model_dir=str(model_dir)), Device("cpu", 0, None, 1))
    r.load()
    assert r.inner is not None, r.prepare_path  # textmask's own prepare, not the fallback
    item = Item(req=None, data=data)  # type: ignore[arg-type]  # prepare reads only the bytes
    p = r.prepare(item)
    return r.finish(item, p, p).masks["mask"]


def test_sync_answer_is_a_mask_of_the_image_size(stack, model_dir) -> None:
    data = (IMAGES / "astronaut.png").read_bytes()
    r = httpx.post(stack.url + "/run_simulated", content=data, headers={"Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["x-mask-format"] == "packbits" and r.headers["x-batch-size"] == "1"
    assert float(r.headers["x-model-ms"]) >= 150 + 5  # one call of one image slept at least this long
    m = codecs.decode_packbits(r.content)
    assert m.shape == (512, 512)
    assert 0 < m.sum() < m.size
    assert (m == reference_mask(data, stack.env["MODEL_DIR"])).all()
    png = httpx.post(stack.url + "/run_simulated?format=png", content=(IMAGES / "chelsea.png").read_bytes(), headers={"Content-Type": "image/png"}, timeout=60)
    assert png.status_code == 200 and codecs.decode_png(png.content).shape == (300, 451)


def test_bad_image_is_refused_and_the_service_still_answers(stack) -> None:
    data = (IMAGES / "astronaut.png").read_bytes()
    r = httpx.post(stack.url + "/run_simulated", content=data[: len(data) // 3], headers={"Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["code"]
    ok = httpx.post(stack.url + "/run_simulated", content=data, headers={"Content-Type": "image/png"}, timeout=60)
    assert ok.status_code == 200 and codecs.decode_packbits(ok.content).shape == (512, 512)


def test_sixteen_concurrent_requests_are_batched(stack) -> None:
    body = jpeg("coffee.png", (512, 512))

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(c.post(stack.url + "/run_simulated", content=body, headers={"Content-Type": "image/jpeg"}) for _ in range(16)))

    rs = asyncio.run(burst())
    assert [r.status_code for r in rs] == [200] * 16
    sizes = [int(r.headers["x-batch-size"]) for r in rs]
    assert max(sizes) > 1, sizes  # while one call sleeps (150 ms), the rest wait and go together
    assert all(1 <= n <= 16 for n in sizes)
    for r, n in zip(rs, sizes, strict=True):
        assert float(r.headers["x-model-ms"]) >= 150 + 5 * n  # the batch's call slept its cost shape
        assert codecs.decode_packbits(r.content).shape == (512, 512)
    first = codecs.decode_packbits(rs[0].content)
    assert all((codecs.decode_packbits(r.content) == first).all() for r in rs)  # same bytes in, same mask out, whatever the batch
