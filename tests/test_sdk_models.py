"""The SDK's model-family calls against real V-JEPA 2 and Mask2Former workers (tiny random-init
checkpoints written by `trifecta models tiny`, loaded through `from_pretrained`). Marked slow:
writing the checkpoints and starting torch workers takes about a minute here (`make chaos`)."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from client.benchkit import ROOT
from client.sdk import AsyncClient, Client, TrifectaClientError
from storage import codecs
from tests.conftest import photo, png_bytes

pytestmark = pytest.mark.slow
W, H = 64, 48


@pytest.fixture(scope="module")
def stack(make_stack, tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("ckpt")
    procs = {n: subprocess.Popen([sys.executable, "-m", "client.cli", "models", "tiny", n, str(d / n)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for n in ("vjepa2", "mask2former")}
    for n, p in procs.items():
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, f"tiny {n}: {out.decode()[-2000:]}"
    env = {"VJEPA2_CHECKPOINT": str(d / "vjepa2"), "M2F_CHECKPOINT": str(d / "mask2former"), "M2F_LONG_SIDE": "256"}
    return make_stack(models=["vjepa2", "mask2former"], env=env)


def clip() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(16)]


def test_vjepa2_clip_sync_async_and_as_a_job(stack) -> None:
    frames = clip()
    with Client(stack.url) as c:
        res = c.vjepa2_infer(frames)
        assert len(res.predictions) == 5 and str(uuid.UUID(res.clip_id)) == res.clip_id
        conf = [p.confidence for p in res.predictions]
        assert conf == sorted(conf, reverse=True) and 0 < sum(conf) <= 1.0001 and all(isinstance(p.label, str) and p.label for p in res.predictions)
        assert res.timing.worker.startswith("vjepa2-") and res.timing.job_id == res.clip_id.replace("-", "")
        # the SDK sends what a hand-written request sends
        raw = httpx.post(stack.url + "/api/v1/infer", json={"frames": [base64.b64encode(f.tobytes()).decode() for f in frames], "width": W, "height": H, "format": "BGR"}, timeout=60).json()
        assert [(p["label"], round(p["confidence"], 5)) for p in raw["predictions"]] == [(p.label, round(p.confidence, 5)) for p in res.predictions]
        # encoded frames work too (their size read from the first one)
        enc = c.vjepa2_infer([png_bytes(Image.fromarray(f[:, :, ::-1])) for f in frames], fmt="BGR")
        assert [p.label for p in enc.predictions] == [p.label for p in res.predictions]
        job = c.submit_frames(frames, W, H, "BGR")
        done = c.wait(job["job_id"], timeout=120)
        assert done["status"] == "succeeded" and [p["label"] for p in done["result"]["meta"]["predictions"]] == [p.label for p in res.predictions]
        with pytest.raises(TrifectaClientError) as e:
            c.vjepa2_infer(frames[:15])
        assert e.value.status == 422

    async def go() -> list[str]:
        async with AsyncClient(stack.url) as ac:
            r = await ac.vjepa2_infer(frames)
            return [p.label for p in r.predictions]

    assert asyncio.run(go()) == [p.label for p in res.predictions]


def test_mask2former_masks_as_numpy(stack) -> None:
    im = photo("coffee.png").resize((160, 120))
    data = png_bytes(im)
    with Client(stack.url) as c:
        batch = c.m2f_segment_batch(data, ["wall", "floor"])
        assert set(batch) == {"wall", "floor"} and all(m.shape == (120, 160) and m.dtype == np.bool_ for m in batch.values())
        raw = httpx.post(stack.url + "/segment-batch", params={"classes": "wall,floor"}, content=data, headers={"Content-Type": "image/png"}, timeout=60).json()
        assert all((codecs.decode_png(base64.b64decode(raw[k])) == batch[k]).all() for k in raw)
        wall = c.m2f_segment(data, "wall")
        assert (wall == batch["wall"]).all()
        every = c.m2f_segment_batch(data, "all")
        cover = np.sum([m.astype(np.uint8) for m in every.values()], axis=0)
        assert (cover == 1).all()  # every pixel in exactly one class
        with pytest.raises(TrifectaClientError) as e:
            c.m2f_segment(data, "unicorn")
        assert e.value.status == 422 and "unicorn" in str(e.value)

    async def go() -> dict[str, np.ndarray]:
        async with AsyncClient(stack.url) as ac:
            return await ac.m2f_segment_batch(data, ["wall", "floor"])

    assert all((m == batch[k]).all() for k, m in asyncio.run(go()).items())


def write_video(path: Path, n: int = 40) -> None:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=25)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        for i in range(n):
            a = np.zeros((H, W, 3), np.uint8)
            a[..., 0] = (i * 7) % 256
            a[10:30, (i % 40) : (i % 40) + 16, 1] = 250
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_sdk_uploads_a_video_job(stack, tmp_path: Path) -> None:
    v = tmp_path / "clip.mp4"
    write_video(v)
    with Client(stack.url) as c:
        job = c.submit_video(v, {"stride": 16})
        seen: list[str] = []
        done = c.wait(job["job_id"], timeout=120, on_progress=lambda st: seen.append(st["status"]))
        assert done["status"] == "succeeded", done
        assert seen[-1] == "succeeded" and done["input"]["kind"] == "video" and done["result"]["meta"]["top_labels"]


def test_results_page_shows_mask2former_classes_and_vjepa2_labels(stack, browser, tmp_path: Path) -> None:  # noqa: F811 - the fixture imported above
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    img = tmp_path / "room.png"
    img.write_bytes(png_bytes(photo("coffee.png").resize((160, 120))))
    with Client(stack.url) as c:
        want = c.m2f_segment_batch(img, ["wall", "floor", "ceiling", "window"])
    wait = WebDriverWait(browser, 60)

    def run(model: str, path: Path) -> str:
        browser.get(stack.url + "/")
        wait.until(lambda d: any(o.get_attribute("value") == model and o.is_enabled() for o in d.find_elements(By.CSS_SELECTOR, "#model option")))
        Select(browser.find_element(By.ID, "model")).select_by_value(model)
        browser.find_element(By.ID, "file").send_keys(str(path))
        browser.find_element(By.ID, "run").click()
        wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") in ("done", "error"))
        st = browser.find_element(By.ID, "status")
        assert st.get_attribute("data-state") == "done", st.text
        return st.text

    assert run("mask2former", img) == f"mask2former: {len(want)} class mask(s)"
    canvas = browser.find_element(By.ID, "view")
    assert int(canvas.get_attribute("data-mask-pixels")) == sum(int(m.sum()) for m in want.values())
    labels = browser.find_element(By.ID, "labels").text
    for name, m in want.items():
        assert f"{name} {100 * m.sum() / m.size:.1f} %" in labels

    v = tmp_path / "clip.mp4"
    write_video(v)
    text = run("vjepa2", v)
    assert text.startswith("vjepa2: ") and text.endswith("label(s)") and not text.startswith("vjepa2: 0 ")
    rows = browser.find_elements(By.CSS_SELECTOR, "#labels tr")
    assert len(rows) >= 2  # a header and at least one label
    assert browser.find_element(By.ID, "video").is_displayed() and not browser.find_element(By.ID, "view").is_displayed()
