"""The results page: `GET /` content negotiation, and a person's path through it in headless
Chromium (Debian's `chromium` + `chromium-driver`, installed by `make install`): pick a
model, upload a photo, see the mask overlaid — checked pixel by pixel on a screenshot."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from storage import codecs
from tests.conftest import with_text

OVERLAY = np.array([255, 0, 80], np.float32)


@pytest.fixture(scope="module")
def stack(make_stack, tmp_path_factory: pytest.TempPathFactory):
    # the pretrained textmask, and next to it an untrained (random-init) SegFormer written by the project's own command
    root = tmp_path_factory.mktemp("models")
    subprocess.run([sys.executable, "-m", "client.cli", "models", "tiny", "segmentation", str(root / "segmentation")], check=True, capture_output=True)
    shutil.copytree(Path(__file__).resolve().parents[1] / "models" / "textmask", root / "textmask")
    return make_stack(models=["textmask", "segmentation"], env={"MODEL_DIR": str(root)})


def test_browser_gets_the_page_and_clients_get_json(stack) -> None:
    r = httpx.get(stack.url + "/", headers={"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}, timeout=5)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert '<canvas id="view"' in r.text and "/run_${encodeURIComponent(model)}?format=png" in r.text
    for accept in ("application/json", "*/*", None):
        r = httpx.get(stack.url + "/", headers={"Accept": accept} if accept else {}, timeout=5)
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), accept
        body = r.json()
        assert body["service"] == "Trifecta" and "POST /run_textmask" in body["endpoints"] and "GET /metrics" in body["endpoints"]


def test_person_uploads_a_photo_and_sees_the_mask_over_it(stack, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    data, gt = with_text("chelsea.png")
    img = tmp_path / "cat-with-text.png"
    img.write_bytes(data)
    # what the page must draw: the service's own PNG mask over the photo
    want = codecs.decode_png(httpx.post(stack.url + "/run_textmask?format=png", content=data, headers={"Content-Type": "image/png"}, timeout=60).content)
    assert want.sum() > 500 and want[gt].sum() / want.sum() > 0.9

    browser.get(stack.url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: any(o.get_attribute("value") == "textmask" and o.is_enabled() for o in d.find_elements(By.CSS_SELECTOR, "#model option")))
    Select(browser.find_element(By.ID, "model")).select_by_value("textmask")
    browser.find_element(By.ID, "file").send_keys(str(img))
    wait.until(ec.element_to_be_clickable((By.ID, "run"))).click()
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") in ("done", "error"))
    status = browser.find_element(By.ID, "status")
    assert status.get_attribute("data-state") == "done", status.text
    assert status.text == f"textmask: mask: {int(want.sum())} of {want.size} pixels"

    canvas = browser.find_element(By.ID, "view")
    assert int(canvas.get_attribute("data-mask-pixels")) == int(want.sum())
    assert (canvas.size["width"], canvas.size["height"]) == (want.shape[1], want.shape[0])
    shot = np.asarray(Image.open(io.BytesIO(canvas.screenshot_as_png)).convert("RGB"), np.float32)
    assert shot.shape[:2] == want.shape
    base = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32)
    blended = base * 0.5 + OVERLAY * 0.5
    # where the mask is, the overlay colour is blended in; everywhere else the photo is untouched
    assert np.abs(shot[want] - blended[want]).mean() < 3
    assert np.abs(shot[~want] - base[~want]).mean() < 3
    assert (shot[want][:, 0] - shot[want][:, 1]).mean() > 60  # visibly red-pink where the text is

    # the labels and the timings the worker reported are on the page
    labels = browser.find_element(By.ID, "labels").text
    assert "textmask" in labels and f"{int(want.sum())} px" in labels
    t = browser.find_element(By.ID, "timings")
    queue_ms = float(t.find_element(By.CSS_SELECTOR, ".t-queue").text)
    model_ms = float(t.find_element(By.CSS_SELECTOR, ".t-model").text)
    assert 0 <= queue_ms < 30_000 and 0 < model_ms < 30_000
    assert t.find_element(By.CSS_SELECTOR, ".t-worker").text.startswith("textmask-")
    browser.save_screenshot(str(tmp_path / "page.png"))


def test_untrained_model_is_never_the_default_and_its_result_is_flagged(stack, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    info = httpx.get(stack.url + "/models/info", timeout=5).json()["models"]
    assert info["segmentation"]["trained"] is False and info["textmask"]["trained"] is True and info["segmentation"]["live_workers"] == 1
    data, _ = with_text("coffee.png")
    img = tmp_path / "coffee-text.png"
    img.write_bytes(data)
    want = codecs.decode_png(httpx.post(stack.url + "/run_segmentation?format=png", content=data, headers={"Content-Type": "image/png"}, timeout=60).content)

    browser.get(stack.url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: any(o.get_attribute("value") == "segmentation" and o.is_enabled() for o in d.find_elements(By.CSS_SELECTOR, "#model option")))
    sel = Select(browser.find_element(By.ID, "model"))
    # segmentation is listed first (model order) and is live, yet the page starts on the trained textmask
    assert sel.first_selected_option.get_attribute("value") == "textmask"
    seg = next(o for o in sel.options if o.get_attribute("value") == "segmentation")
    assert seg.text == "segmentation (untrained)"
    warning = browser.find_element(By.ID, "untrained")
    assert not warning.is_displayed()

    sel.select_by_value("segmentation")
    assert "UNTRAINED" in browser.find_element(By.ID, "model-hint").text
    browser.find_element(By.ID, "file").send_keys(str(img))
    wait.until(ec.element_to_be_clickable((By.ID, "run"))).click()
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") in ("done", "error"))
    status = browser.find_element(By.ID, "status")
    assert status.text == f"segmentation: mask: {int(want.sum())} of {want.size} pixels", status.text
    assert warning.is_displayed() and "segmentation is UNTRAINED" in warning.text and "meaningless" in warning.text
    # the warning sits over the result: above the canvas on the page
    assert warning.location["y"] < browser.find_element(By.ID, "view").location["y"]

    # a trained model's result carries no warning
    sel.select_by_value("textmask")
    browser.find_element(By.ID, "run").click()
    wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("textmask: mask:"))
    assert not browser.find_element(By.ID, "untrained").is_displayed()
