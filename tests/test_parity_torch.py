"""Reference parity of every torch family, through the real HTTP path.

Each family's tiny random-init checkpoint (`trifecta models tiny NAME DIR`) is served by a real
worker process behind the real API; the same checkpoint is loaded here with transformers' own
classes and run on the same input with transformers' own pre- and post-processing. The service's
answer must be that answer:

- Mask2Former (`/segment-batch`, `/segment`): `AutoImageProcessor` + the model +
  `post_process_semantic_segmentation(target_sizes=[(H, W)])`: the label maps are identical.
  The one deliberate step before the reference recipe, an image's long side scaled down to
  M2F_LONG_SIDE (as the source service did), is applied to the reference's input too.
- SAM3 image (`/api/v1/image/segment`, text and box prompts): `Sam3Processor` + `Sam3Model` +
  `post_process_instance_segmentation`: the same masks, scores and boxes within 1e-4.
- SAM3 video (session prompt + propagate): `Sam3VideoProcessor`'s inference session +
  `Sam3VideoModel` (the same calls: text prompt, the prompt frame, `propagate_in_video_iterator`,
  `postprocess_outputs`): the same objects with the same masks on every frame.
- V-JEPA 2 (`/api/v1/infer`): the checkpoint's video processor + `VJEPA2ForVideoClassification`:
  the same top-5 labels, confidences within 1e-4.

The workers run with INTRA_OP_THREADS=1; the references run on one thread as well. One stack at
a time (class-scoped), small inputs: torch is heavy on a small machine.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from storage import codecs
from tests.conftest import photo, png_bytes
from tests.helpers.stacks import start_stack, tiny_checkpoint
from tests.helpers.videos import H as VH
from tests.helpers.videos import N as VN
from tests.helpers.videos import W as VW
from tests.helpers.videos import read_frames, write_video

torch = pytest.importorskip("torch")
B = 120.0
TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The references on one thread, as the workers (INTRA_OP_THREADS=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ================================================================ Mask2Former
LONG_SIDE = 256  # this stack's M2F_LONG_SIDE


@pytest.fixture(scope="class")
def m2f_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint("mask2former", tmp_path_factory.mktemp("m2f") / "tiny")


@pytest.fixture(scope="class")
def m2f_stack(redis_server, model_dir: Path, m2f_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    st = start_stack(redis_server.port, model_dir, tmp_path_factory.mktemp("stack"), ["mask2former"], {"M2F_CHECKPOINT": str(m2f_ckpt), "M2F_LONG_SIDE": str(LONG_SIDE)})
    yield st
    st.stop()


@pytest.fixture(scope="class")
def m2f_reference(m2f_ckpt: Path):
    """transformers' recipe on the checkpoint, after the service's one documented extra step."""
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

    proc = AutoImageProcessor.from_pretrained(str(m2f_ckpt))
    net = Mask2FormerForUniversalSegmentation.from_pretrained(str(m2f_ckpt)).eval()

    def run(im: Image.Image) -> np.ndarray:
        W, H = im.size
        k = LONG_SIDE / max(W, H)
        if k < 1:  # M2F_LONG_SIDE: the long side scaled down first (Pillow bilinear, sizes rounded)
            im = im.resize((max(1, round(W * k)), max(1, round(H * k))), Image.BILINEAR)
        inputs = proc(images=im, return_tensors="pt")
        with torch.inference_mode():
            out = net(**inputs)
        return proc.post_process_semantic_segmentation(out, target_sizes=[(H, W)])[0].numpy()

    run.labels = [str(net.config.id2label[i]).strip() for i in range(net.config.num_labels)]  # type: ignore[attr-defined]
    return run


class TestMask2Former:
    @pytest.mark.parametrize(
        ("name", "crop"),
        [
            ("chelsea.png", None),  # 451 x 300: scaled down to 256 first, the label map made at 451 x 300
            ("coffee.png", (100, 60, 300, 200)),  # 200 x 140: under M2F_LONG_SIDE, straight to the processor
        ],
    )
    def test_label_maps_are_the_processors_post_processing(self, m2f_stack, m2f_reference, name: str, crop) -> None:
        stack, reference = m2f_stack, m2f_reference
        from tasks import seglabels

        im = photo(name)
        if crop:
            im = im.crop(crop)
        W, H = im.size
        ref = reference(im)
        data = png_bytes(im)
        ids = {seglabels.norm(lbl): i for i, lbl in enumerate(reference.labels)}
        # every class present, from one inference
        r = httpx.post(stack.url + "/segment-batch", params={"classes": "all"}, content=data, headers={"Content-Type": "image/png"}, timeout=B)
        assert r.status_code == 200, r.text
        got = np.full((H, W), -1, np.int32)
        for cname, b64 in r.json().items():
            m = codecs.decode_png(base64.b64decode(b64))
            assert m.shape == (H, W) and not (got[m] >= 0).any(), f"{cname}: a pixel in two masks"
            got[m] = ids[cname]
        assert (got >= 0).all(), "every pixel has a class"
        diff = int((got != ref).sum())
        assert diff == 0, f"{diff} of {H * W} pixels differ from post_process_semantic_segmentation"
        assert sorted(r.headers["x-classes"].split(",")) == sorted(seglabels.norm(reference.labels[c]) for c in np.unique(ref))
        # the default four classes (one inference) and a single /segment mask agree with it too
        r = httpx.post(stack.url + "/segment-batch", content=data, headers={"Content-Type": "image/png"}, timeout=B)
        assert r.status_code == 200, r.text
        for cname, b64 in r.json().items():
            cid = ids["windowpane" if cname == "window" else cname]
            assert (codecs.decode_png(base64.b64decode(b64)) == (ref == cid)).all(), cname
        r = httpx.post(stack.url + "/segment", content=data, headers={"Content-Type": "image/png", "X-Mask": "floor"}, timeout=B)
        assert r.status_code == 200 and int(r.headers["x-class-id"]) == ids["floor"]
        assert (codecs.decode_png(r.content) == (ref == ids["floor"])).all()


# ================================================================ SAM3: image and video (one sam3 worker)
@pytest.fixture(scope="class")
def sam3_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint("sam3", tmp_path_factory.mktemp("sam3") / "tiny")


@pytest.fixture(scope="class")
def sam3_videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("videos")
    write_video(d / "shapes.mp4")
    return d


@pytest.fixture(scope="class")
def sam3_stack(redis_server, model_dir: Path, sam3_ckpt: Path, sam3_videos: Path, tmp_path_factory: pytest.TempPathFactory):
    env = {"SAM3_CHECKPOINT": str(sam3_ckpt), "ALLOWED_INPUT_ROOTS": str(sam3_videos), "MAX_BATCH_SIZE": "1", "MAX_PROMPTS": "8"}
    st = start_stack(redis_server.port, model_dir, tmp_path_factory.mktemp("stack"), ["sam3"], env)
    yield st
    st.stop()


@pytest.fixture(scope="class")
def sam3_image_reference(sam3_ckpt: Path):
    from transformers import Sam3Model, Sam3Processor

    proc = Sam3Processor.from_pretrained(str(sam3_ckpt))
    net = Sam3Model.from_pretrained(str(sam3_ckpt)).eval()

    def run(im: Image.Image, text: str | None, box: list[float] | None, threshold: float) -> dict:
        W, H = im.size
        kw = {}
        if box is not None:  # the service takes [cx, cy, w, h] normalised; the processor xyxy pixels
            cx, cy, bw, bh = box
            kw = {"input_boxes": [[[(cx - bw / 2) * W, (cy - bh / 2) * H, (cx + bw / 2) * W, (cy + bh / 2) * H]]], "input_boxes_labels": [[1]]}
        inputs = proc(images=im, text=text, return_tensors="pt", **kw)
        with torch.inference_mode():
            out = net(**inputs)
        return proc.post_process_instance_segmentation(out, threshold=threshold, mask_threshold=0.5, target_sizes=[(H, W)])[0]

    return run


class TestSam3:
    # -- image ------------------------------------------------------------------------

    @pytest.mark.parametrize(
        ("name", "prompts"),
        [
            ("chelsea.png", [{"type": "text", "text": "cat"}]),
            ("coffee.png", [{"type": "box", "box": [0.45, 0.5, 0.4, 0.5], "label": True}]),
            ("astronaut.png", [{"type": "text", "text": "a helmet"}, {"type": "box", "box": [0.5, 0.3, 0.3, 0.3], "label": True}]),
        ],
    )
    def test_image_masks_scores_and_boxes_are_the_processors(self, sam3_stack, sam3_image_reference, name: str, prompts: list[dict]) -> None:
        stack, image_reference = sam3_stack, sam3_image_reference
        im = photo(name)
        if name == "astronaut.png":
            im = im.resize((256, 256))
        W, H = im.size
        text = next((p["text"] for p in prompts if p["type"] == "text"), None)
        box = next((p["box"] for p in prompts if p["type"] == "box"), None)
        threshold = 0.1
        ref = image_reference(im, text, box, threshold)
        r = httpx.post(stack.url + "/api/v1/image/segment", json={"image": _b64(png_bytes(im)), "prompts": prompts, "confidence_threshold": threshold}, timeout=B)
        assert r.status_code == 200, r.text
        body = r.json()
        order = torch.argsort(ref["scores"], descending=True, stable=True)
        want_scores = ref["scores"][order].tolist()
        assert body["num_masks"] == len(want_scores) > 0
        assert body["scores"] == pytest.approx(want_scores, abs=TOL)
        # boxes: the service answers [cx, cy, w, h] normalised, clamped to the image (the reference's are pixels, unclamped)
        xyxy = ref["boxes"][order] / torch.tensor([W, H, W, H])
        xyxy = xyxy.clamp(0, 1)
        want_boxes = torch.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2, xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], 1)
        assert np.allclose(np.array(body["boxes"]), want_boxes.numpy(), atol=TOL)
        masks = ref["masks"][order].bool().numpy()
        for i, (rle, want) in enumerate(zip(body["masks"], masks, strict=True)):
            got = codecs.decode_rle(rle)
            assert got.shape == (H, W)
            assert int((got != want).sum()) == 0, f"mask {i}: {int((got != want).sum())} pixels differ"
        assert any(m.any() for m in masks), "the masks are not all empty"

    # -- video ------------------------------------------------------------------------
    def test_video_prompt_and_propagation_are_the_session_apis(self, sam3_stack, sam3_ckpt: Path, sam3_videos: Path) -> None:
        stack, ckpt, videos = sam3_stack, sam3_ckpt, sam3_videos
        from transformers import Sam3VideoModel, Sam3VideoProcessor

        text = "red square"
        api = stack.url + "/api/v1/video"
        r = httpx.post(api + "/session/start", json={"resource_path": str(videos / "shapes.mp4"), "session_id": "parity"}, timeout=B)
        assert r.status_code == 200, r.text
        p = httpx.post(api + "/session/parity/prompt", json={"frame_index": 0, "prompts": [{"type": "text", "text": text}]}, timeout=B)
        assert p.status_code == 200, p.text
        prop = httpx.post(api + "/session/parity/propagate", json={"direction": "forward", "start_frame_index": 0}, timeout=B)
        assert prop.status_code == 200, prop.text
        results = prop.json()["results"]
        httpx.delete(api + "/session/parity", timeout=B)

        # the reference: the same calls on transformers' own inference session
        proc = Sam3VideoProcessor.from_pretrained(str(ckpt))
        net = Sam3VideoModel.from_pretrained(str(ckpt)).eval()
        frames = read_frames(videos / "shapes.mp4")
        assert len(frames) == VN
        with torch.inference_mode():
            session = proc.init_video_session(video=frames, inference_device="cpu", dtype=torch.float32)
            session = proc.add_text_prompt(inference_session=session, text=[text])
            first = proc.postprocess_outputs(session, net(inference_session=session, frame_idx=0))
            want = {int(out.frame_idx): proc.postprocess_outputs(session, out) for out in net.propagate_in_video_iterator(inference_session=session, start_frame_idx=0, reverse=False)}

        def same(objects: list[dict], ref: dict, where: str) -> int:
            ids = [int(i) for i in ref["object_ids"]]
            assert [o["id"] for o in objects] == ids, where
            for o, m, s, b in zip(objects, ref["masks"], ref["scores"], ref["boxes"], strict=True):
                got = codecs.decode_rle(o["mask"])
                assert got.shape == (VH, VW) and (got == np.asarray(m, bool)).all(), f"{where}, object {o['id']}: {int((got != np.asarray(m, bool)).sum())} pixels differ"
                assert o["score"] == pytest.approx(float(s), abs=TOL), where
                x0, y0, x1, y1 = (float(v) for v in b)
                assert o["box"] == pytest.approx([(x0 + x1) / 2 / VW, (y0 + y1) / 2 / VH, (x1 - x0) / VW, (y1 - y0) / VH], abs=TOL), where
            return len(ids)

        body = p.json()
        prompt_objects = [{"id": i, "mask": m, "box": b, "score": s} for i, m, b, s in zip(body["obj_ids"], body["masks"], body["boxes"], body["scores"], strict=True)]
        assert same(prompt_objects, first, "the prompt frame") > 0
        assert sorted(int(k) for k in results) == sorted(want) == list(range(VN))
        tracked = sum(same(results[str(fi)]["objects"], want[fi], f"frame {fi}") for fi in sorted(want))
        assert tracked >= VN, "objects on the frames, not only frames"


# ================================================================ V-JEPA 2
@pytest.fixture(scope="class")
def vjepa2_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint("vjepa2", tmp_path_factory.mktemp("vjepa2") / "tiny")


@pytest.fixture(scope="class")
def vjepa2_stack(redis_server, model_dir: Path, vjepa2_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    st = start_stack(redis_server.port, model_dir, tmp_path_factory.mktemp("stack"), ["vjepa2"], {"VJEPA2_CHECKPOINT": str(vjepa2_ckpt)})
    yield st
    st.stop()


class TestVJEPA2:
    @pytest.mark.parametrize("seed", [1, 2])
    def test_top5_is_the_video_processor_and_model(self, vjepa2_stack, vjepa2_ckpt: Path, seed: int) -> None:
        stack, ckpt = vjepa2_stack, vjepa2_ckpt
        from transformers import AutoVideoProcessor, VJEPA2ForVideoClassification

        # 16 frames of a real photo panning, 80 x 60 (resized and centre-cropped by the processor)
        im = np.asarray(photo("astronaut.png").resize((160, 60)))
        frames = np.stack([im[:, 5 * i + seed : 5 * i + seed + 80] for i in range(16)])
        body = {"frames": [_b64(png_bytes(Image.fromarray(f))) for f in frames], "width": 80, "height": 60, "format": "RGB"}
        r = httpx.post(stack.url + "/api/v1/infer", json=body, timeout=B)
        assert r.status_code == 200, r.text
        got = r.json()["predictions"]

        proc = AutoVideoProcessor.from_pretrained(str(ckpt))
        net = VJEPA2ForVideoClassification.from_pretrained(str(ckpt)).eval()
        with torch.inference_mode():
            probs = net(**proc(videos=frames, return_tensors="pt")).logits.softmax(-1)[0]
        conf, idx = probs.topk(5)
        want = [(net.config.id2label[int(i)], float(c)) for c, i in zip(conf, idx, strict=True)]
        assert [p["label"] for p in got] == [lbl for lbl, _ in want]
        assert [p["confidence"] for p in got] == pytest.approx([c for _, c in want], abs=TOL)
