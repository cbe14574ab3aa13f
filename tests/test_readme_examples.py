"""Every example in README.md and the docs pages it links runs as written, against a live stack.

The stack is the one a user starts: `trifecta up` (embedded Redis, one worker per model, the
API, Flower), here with every model (textmask and echo by default, the torch families from the
tiny random-init checkpoints `trifecta up` falls back to offline). Each ```bash block runs in
bash with `set -euo pipefail` in a folder holding a copy of the files the examples name
(`tests/data/images/…`), the venv's `bin` on PATH; the only rewrite is the address, from the
documented `127.0.0.1:8080` / `:5555` to the free ports the test took. Every HTTP status curl
saw is recorded (a curl shell function adds `-w` to stderr), and each block has a check below
that asserts on the answer's values. A block this suite may not run (it starts the stack, needs
Docker or a cluster, or measures for minutes) must consist only of commands `EXEMPT` lists.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers.examples import ROOT, Block, blocks, commands, exempt_reason
from PIL import Image

from tasks.embedded_redis import free_port

ALL_BLOCKS = blocks()
PRELUDE = """set -euo pipefail
curl() { command curl -w '%{stderr}HTTP_STATUS %{http_code}\\n' "$@"; }
"""


@dataclass
class Ran:
    block: Block
    rc: int
    stdout: str
    stderr: str
    statuses: list[int]
    cwd: Path

    def json(self) -> object:
        return json.loads(self.stdout)

    def lines_json(self) -> list[object]:
        return [json.loads(x) for x in self.stdout.splitlines() if x.strip()]

    def png(self, name: str) -> np.ndarray:
        return np.asarray(Image.open(self.cwd / name))


@dataclass
class Live:
    api: str
    flower: str
    cwd: Path
    env: dict[str, str]


def _sandbox(tmp: Path) -> Path:
    box = tmp / "box"
    shutil.copytree(ROOT / "tests" / "data", box / "tests" / "data")  # the photos and the video the examples name
    os.symlink(sys.prefix, box / ".venv")  # the venv this suite runs in: `.venv/bin/trifecta` as the examples write it
    return box


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("examples")
    box = _sandbox(tmp)
    api_port, flower_port = free_port(), free_port()
    api_url = f"http://127.0.0.1:{api_port}"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.prefix) / 'bin'}:{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # nothing answers there: `trifecta up` starts its own, as on a bare machine
        "MODELS": "textmask,echo,sam3,vjepa2,mask2former",
        "MODEL_DIR": str(box / "models"),
        "API_PORT": str(api_port),
        "FLOWER_PORT": str(flower_port),
        "FLOWER_BASIC_AUTH": "admin:secret",
        "TRIFECTA_URL": api_url,  # where the CLI and the SDK look for the server (the documented default is :8080)
        "ALLOWED_INPUT_ROOTS": str(box),  # the examples' file:// inputs: "start the stack with ALLOWED_INPUT_ROOTS=$PWD"
        "WEBHOOK_SECRET": "examples-secret",  # the webhook example's stack: WEBHOOK_SECRET=… WEBHOOK_ALLOWED_HOSTS=hooks.example.com
        "WEBHOOK_ALLOWED_HOSTS": "hooks.example.com",
        "PYTHONUNBUFFERED": "1",
    }
    log = open(tmp / "up.log", "ab")  # noqa: SIM115
    p = subprocess.Popen([sys.executable, "-m", "client.cli", "up"], cwd=box, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{api_port}"
    want = set(env["MODELS"].split(","))
    t_end = time.time() + 240
    try:
        while True:
            assert p.poll() is None, (tmp / "up.log").read_text()[-4000:]
            assert time.time() < t_end, "the stack did not come up:\n" + (tmp / "up.log").read_text()[-4000:]
            try:
                h = httpx.get(api + "/health", timeout=2).json()
                if all(h.get("queues", {}).get(m, {}).get("workers") for m in want):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        yield Live(api, f"http://127.0.0.1:{flower_port}", box, env)
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def run_block(b: Block, live: Live, timeout: float = 180) -> Ran:
    code = b.code.replace("127.0.0.1:8080", live.api.removeprefix("http://")).replace("localhost:8080", live.api.removeprefix("http://"))
    code = code.replace("127.0.0.1:5555", live.flower.removeprefix("http://")).replace("localhost:5555", live.flower.removeprefix("http://"))
    if b.lang == "python":
        cmd = [sys.executable, "-c", code]
    else:
        cmd = ["bash", "-c", PRELUDE + code]
    r = subprocess.run(cmd, cwd=live.cwd, env=live.env, capture_output=True, text=True, timeout=timeout)
    statuses = [int(x.split()[1]) for x in r.stderr.splitlines() if x.startswith("HTTP_STATUS ")]
    return Ran(b, r.returncode, r.stdout, r.stderr, statuses, live.cwd)


# ------------------------------------------------------------------------ checks, one per block
# Keyed by a string found in exactly one block. A check asserts on the answer's values; before it
# runs, the block must have exited 0 with every HTTP status below 400 (unless `expect` says otherwise).
CHECKS: dict[str, Callable[[Ran], None]] = {}
EXPECT_STATUS: dict[str, set[int]] = {}


def check(key: str, expect: set[int] | None = None) -> Callable[[Callable[[Ran], None]], Callable[[Ran], None]]:
    def deco(fn: Callable[[Ran], None]) -> Callable[[Ran], None]:
        CHECKS[key] = fn
        if expect is not None:
            EXPECT_STATUS[key] = expect
        return fn

    return deco


def _key_for(b: Block) -> str:
    keys = [k for k in CHECKS if k in b.code]
    assert len(keys) == 1, f"{b.id}: an example needs exactly one check in {__file__} (found {keys}):\n{b.code}"
    return keys[0]


def _runnable(b: Block) -> bool:
    if b.lang == "python":
        return True
    cmds = commands(b.code)
    reasons = [exempt_reason(c) for c in cmds]
    return not all(reasons)  # a block mixing both fails in test_example: split it


def test_every_example_is_found() -> None:
    """The docs the README links exist and hold examples (a broken link would silently drop them)."""
    pages = {b.page for b in ALL_BLOCKS}
    assert "README.md" in pages
    assert len(pages) >= 3, pages
    for b in ALL_BLOCKS:
        if not _runnable(b):
            for c in commands(b.code):
                assert exempt_reason(c), c


RUNNABLE = [b for b in ALL_BLOCKS if _runnable(b)]


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_example(block: Block, live: Live) -> None:
    if block.lang != "python":
        mixed = [c for c in commands(block.code) if exempt_reason(c)]
        assert not mixed, f"{block.id}: split the block: it mixes commands run here with ones that may not run here ({mixed})"
    key = _key_for(block)
    ran = run_block(block, live)
    assert ran.rc == 0, f"{block.id} exited {ran.rc}\n--- stdout\n{ran.stdout[-3000:]}\n--- stderr\n{ran.stderr[-3000:]}"
    allowed = EXPECT_STATUS.get(key)
    bad = [s for s in ran.statuses if (s not in allowed if allowed else s >= 400)]
    assert not bad, f"{block.id}: HTTP {bad}\n--- stdout\n{ran.stdout[-3000:]}\n--- stderr\n{ran.stderr[-3000:]}"
    CHECKS[key](ran)


# ------------------------------------------------------------------------ README.md
TEXT_HW = (172, 448)  # tests/data/images/text.png


@check("trifecta overlay tests/data/images/text.png mask.png -o overlay.png")
def _quickstart(r: Ran) -> None:
    m = r.png("mask.png")
    assert m.shape == TEXT_HW and set(np.unique(m)) <= {0, 255}
    share = (m > 0).mean()
    assert 0.10 < share < 0.40, f"{share:.2%} of text.png marked: the writing is two full lines"
    # both printed lines are covered: rows of the upper and the lower half hold text
    rows = (m > 0).any(axis=1)
    assert rows[: TEXT_HW[0] // 2].any() and rows[TEXT_HW[0] // 2 :].any()
    overlay = r.png("overlay.png")
    assert overlay.shape[:2] == TEXT_HW
    # the README's picture is this answer, drawn by this command (cp overlay.png docs/img/quickstart-overlay.png)
    shown = np.asarray(Image.open(ROOT / "docs/img/quickstart-overlay.png"))
    assert np.array_equal(shown, overlay), "docs/img/quickstart-overlay.png is not what the quick start answers now: copy the new overlay.png there"


@check("run_textmask?format=rle")
def _sync_rle(r: Ran) -> None:
    d = r.json()
    assert d["size"] == list(TEXT_HW)
    assert d["regions"] >= 2
    first = d["first"]
    assert len(first["points"]) == 4 and all(len(p) == 2 for p in first["points"])
    assert 0.5 <= first["score"] <= 1.0


@check(".venv/bin/trifecta submit tests/data/images/coffee.png")
def _jobs(r: Ran) -> None:
    m = r.png("job-mask.png")
    assert m.shape == TEXT_HW and (m > 0).mean() > 0.10
    assert "succeeded" in r.stdout


@check("-F file=@shard-000.tar")
def _shards(r: Ran) -> None:
    samples = r.json()
    assert sorted(s["key"] for s in samples) == ["chelsea", "coffee", "text"]
    assert all(s["status"] == "ok" for s in samples)


@check("/api/v1/image/segment -F file=@tests/data/images/chelsea.png")
def _sam3_image(r: Ran) -> None:
    d = r.json()
    assert d["image_size"] == {"width": 451, "height": 300}
    assert isinstance(d["num_masks"], int) and len(d["scores"]) == d["num_masks"]


@check("session/upload -F file=@tests/data/videos/chelsea-pan.mp4 -F session_id=cat-1")
def _sam3_video(r: Ran) -> None:
    info, obj_ids, n_frames, closed = r.lines_json()
    assert info["total_frames"] == 24 and info["resolution"] == {"width": 320, "height": 240}
    assert len(obj_ids) == 1 and n_frames == 6 and closed is True  # the prompt frame and 5 more


@check("-F 'params={\"stride\": 8}' -F file=@tests/data/videos/chelsea-pan.mp4")
def _vjepa2(r: Ran) -> None:
    assert int(r.stdout.strip().splitlines()[-1]) == 2  # 24 frames, 16 per clip, stride 8


@check("segment-batch?classes=wall,floor,sky,person")
def _m2f(r: Ran) -> None:
    keys = r.json()
    assert set(keys) <= {"wall", "floor", "sky", "person"}


@check("grep -c '^trifecta_'")
def _ops(r: Ran) -> None:
    out = r.stdout.splitlines()
    health = json.loads(out[0])
    assert health["status"] == "healthy" and health["ready"] is True and health["workers"] == 5
    assert out[-3].strip() == "true"  # textmask is pretrained
    assert int(out[-2]) > 20
    assert int(out[-1]) >= 5


# ------------------------------------------------------------------------ docs/images.md
def _packbits(path: Path) -> np.ndarray:
    import struct

    buf = path.read_bytes()
    h, w, stride = struct.unpack(">HHH", buf[:6])
    assert len(buf) == 6 + h * stride
    return np.unpackbits(np.frombuffer(buf, np.uint8, offset=6).reshape(h, stride), axis=1, count=w).astype(bool)


@check("-D batch-headers.txt -o masks.bin")
def _images_sync(r: Ran) -> None:
    assert r.png("mask.png").shape == TEXT_HW
    a, b = _packbits(r.cwd / "mask.packbits"), _packbits(r.cwd / "mask-gz.packbits")
    assert a.shape == (427, 640) and np.array_equal(a, b)  # the gzip body gives the same answer
    assert "x-mask-format: packbits" in (r.cwd / "headers.txt").read_text().lower()
    headers = (r.cwd / "batch-headers.txt").read_text().lower()
    assert "x-sample-keys: text,coffee" in headers and "x-batch-size: 2" in headers
    buf, shapes, i = (r.cwd / "masks.bin").read_bytes(), [], 0
    while i < len(buf):
        n = int.from_bytes(buf[i : i + 4], "big")
        (r.cwd / "one.packbits").write_bytes(buf[i + 4 : i + 4 + n])
        shapes.append(_packbits(r.cwd / "one.packbits").shape)
        i += 4 + n
    assert shapes == [TEXT_HW, (400, 600)]
    echo = json.loads(r.stdout.strip().splitlines()[-1])
    assert echo["bytes"] == (r.cwd / "tests/data/images/rocket.jpg").stat().st_size


@check('buf = open("mask.packbits", "rb").read()')
def _packbits_python(r: Ran) -> None:
    h, w, n = map(int, r.stdout.split())
    assert (h, w) == (427, 640) and n == int(_packbits(r.cwd / "mask.packbits").sum())


@check("Idempotency-Key: photo-42")
def _images_jobs(r: Ran) -> None:
    out = r.stdout.splitlines()
    assert out[:2] == ["queued", "queued"]  # multipart, by URI
    assert json.loads(out[2]) == {"status": "succeeded", "outputs": ["mask"]}
    assert r.png("job-mask.png").shape == TEXT_HW
    assert int(out[3]) >= 3
    assert out[4] == "succeeded"  # a finished job stays as it is


@check("map_values(.live_workers)")
def _images_ops(r: Ran) -> None:
    health, live, ping = r.lines_json()
    assert health == {"status": "healthy", "ready": True, "workers": 5}
    assert {m for m, n in live.items() if n} == {"textmask", "echo", "sam3", "vjepa2", "mask2former"}
    assert ping == {"ok": True}


@check("-H 'X-Mask-Format: rle'")
def _images_textmask_regions(r: Ran) -> None:
    sync, strict = r.lines_json()
    assert sync["size"] == list(TEXT_HW) and sync["regions"] == 6  # RapidOCR 1.4.4 finds 6 regions on text.png
    assert sync["first"]["points"] == [[3.0, 23.0], [121.0, 58.0], [104.0, 114.0], [0.0, 79.0]] and 0.5 <= sync["first"]["score"] < 0.6
    assert strict["regions"] == 5 and strict["min_score"] >= 0.6  # box_thresh 0.6 drops the one region scored below it


# ------------------------------------------------------------------------ docs/shards.md
@check("Idempotency-Key: nightly-42")
def _shards_api(r: Ran) -> None:
    out = r.stdout.splitlines()
    assert out[0] == "queued"
    shown = json.loads(out[1])
    assert shown["outputs"] == ["00000-shard-000.tar", "00001-shard-001.tar", "manifest.json"]
    assert shown["progress"]["samples_done"] == 4 and shown["progress"]["shards_done"] == 2
    assert json.loads(out[2]) == {"shards": 2, "samples": 4, "done": 4, "failed": 0}
    members = out[3:5]
    assert sorted(members) == ["coffee.json", "coffee.png", "text.json", "text.png"][: len(members)] or len(out) > 5
    assert out[-1] == "succeeded"


@check('--shards "file://$PWD/shards/shard-{000..001}.tar" --format png --wait')
def _shards_cli(r: Ran) -> None:
    assert "succeeded" in r.stdout and "manifest.json" in r.stdout


# ------------------------------------------------------------------------ docs/sam3-image.md
@check("> segment.json")
def _sam3_json(r: Ran) -> None:
    d = r.json()
    assert d["image_size"] == {"width": 451, "height": 300} and len(d["scores"]) == d["num_masks"]


@check('-F "prompt=a rocket"')
def _sam3_form(r: Ran) -> None:
    d = r.json()
    assert d["image_size"] == {"width": 640, "height": 427} and d["num_objects"] == d["num_masks"]


@check("> prompts.json")
def _sam3_cached(r: Ran) -> None:
    first, second = r.lines_json()
    assert first["prompts"] == second["prompts"] == ["person", "flag", "rocket"]
    assert second["cache_hit"] is True


@check("> sam3-job.json")
def _sam3_job(r: Ran) -> None:
    assert r.lines_json()[0][0]["prompt"] == "cat"
    assert r.png("union.png").shape == (300, 451)


# ------------------------------------------------------------------------ docs/sam3-video.md
@check('\\"session_id\\": \\"street-1\\"')
def _sam3_video_api(r: Ran) -> None:
    out = r.stdout.splitlines()
    info = json.loads(out[0])
    assert info["total_frames"] == 24 and info["resolution"] == {"width": 320, "height": 240}
    assert out[1] == "ready"
    text = json.loads(out[2])
    assert text["frame_index"] == 0 and len(text["obj_ids"]) >= 1
    box = json.loads(out[4])
    assert box["obj_ids"] == [box["obj_id"]] and box["obj_id"] not in text["obj_ids"]
    assert json.loads(out[5]) == {"total_frames": 13, "frames": 13}  # frames 12 ± 6
    assert int(out[6]) == 24
    job = json.loads(out[7])
    assert job == {"kind": "video-propagate", "progress": 24, "frames": 24}
    assert json.loads(out[8])["frame_index"] == 20
    assert out[9] == "succeeded"
    assert json.loads(out[11])["removed"] is True and json.loads(out[12])["reset"] is True
    assert json.loads(out[13]) == ["street-1", "street-2"]
    assert out[14:16] == ["true", "true"]


@check('"session_id": "street-3"')
def _sam3_video_ws(r: Ran) -> None:
    frames = [line for line in r.stdout.splitlines() if not line.startswith("{")]
    assert [int(x.split()[0]) for x in frames] == list(range(24))
    assert json.loads(r.stdout.splitlines()[-1])["type"] == "complete"


# ------------------------------------------------------------------------ docs/vjepa2-mask2former.md
@check("trifecta models tiny vjepa2 ./models/vjepa2-tiny")
def _tiny(r: Ran) -> None:
    assert (r.cwd / "models/vjepa2-tiny/config.json").is_file() and (r.cwd / "models/m2f-tiny/model.safetensors").is_file()


@check("-d @clip.json")
def _vjepa2_infer(r: Ran) -> None:
    d = r.json()
    assert d["predictions"] == 5 and 0 <= d["first"]["confidence"] <= 1 and d["clip_id"]
    assert "x-worker:" in (r.cwd / "infer-headers.txt").read_text().lower()


@check("'.endpoints | keys | length'")
def _service_description(r: Ran) -> None:
    assert int(r.stdout) >= 10


@check("-d @clips.json")
def _vjepa2_frames_job(r: Ran) -> None:
    d = r.json()
    assert d["progress"] == 2 and d["clips"] == [[0, 0.0, 2.0], [1, 2.0, 4.0]]


@check("> timeline.json")
def _vjepa2_video_job(r: Ran) -> None:
    out = r.stdout.splitlines()
    assert out[0] == "queued"
    assert json.loads(out[1]) == {"frames": 24, "stride": 4, "clips": [[0, 15], [4, 19], [8, 23]]}


@check("-D segment-headers.txt -o wall.png")
def _m2f_segment(r: Ran) -> None:
    m = r.png("wall.png")
    assert m.shape == (427, 640) and set(np.unique(m)) <= {0, 255}
    assert "x-mask: wall" in (r.cwd / "segment-headers.txt").read_text().lower()


@check("segment-batch -H 'X-Model: mask2former_ade20k'")
def _m2f_batch(r: Ran) -> None:
    default, asked = r.lines_json()
    assert default == ["ceiling", "floor", "wall", "window"]
    assert asked == ["door", "sofa", "wall", "window"]


@check('\\"classes\\": \\"all\\"')
def _m2f_job(r: Ran) -> None:
    d = r.json()
    assert d["outputs"] == d["classes"] + 1  # one mask per class present, plus labels.png
    assert r.png("labels.png").shape == (400, 600)


# ------------------------------------------------------------------------ docs/operations.md
@check("api/workers?refresh=1")
def _flower(r: Ran) -> None:
    workers, queues = r.lines_json()
    assert workers == 5
    assert {"textmask", "echo", "sam3", "vjepa2", "mask2former"} <= set(queues)


@check('\\"callback_url\\": \\"https://hooks.example.com/trifecta\\"')
def _webhook_submit(r: Ran) -> None:
    assert r.stdout.strip() == "queued"


@check("def verify(secret: str, header: str, body: bytes")
def _verify(r: Ran) -> None:
    assert r.stdout.split() == ["True", "False"]


@check("from client.sdk import AsyncClient, Client")
def _sdk(r: Ran) -> None:
    out = r.stdout.splitlines()
    assert out[0] == "(172, 448) (427, 640) True textmask-cpu-0" or out[0].startswith("(172, 448) (427, 640) True ")
    assert out[1] == "[(172, 448), (400, 600)]" and out[2] == "succeeded (172, 448)" and out[3] == "2"
    assert out[-2].startswith("healthy 1 True") and out[-1] == "[(172, 448), (400, 600)]"


@check("trifecta submit tests/data/images/text.png tests/data/images/coffee.png")
def _cli(r: Ran) -> None:
    assert r.stdout.count("succeeded") >= 4
    assert r.png("cli-mask.png").shape == TEXT_HW and r.png("cli-overlay.png").shape[:2] == TEXT_HW
    assert "httpx" not in r.stderr  # no library log lines unless -v


@check("trifecta submit tests/data/images/coffee.png --model textmask --json")
def _cli_json(r: Ran) -> None:
    assert r.stdout.strip() in {"queued", "running", "succeeded"}


@check("trifecta storage lifecycle")
def _storage_lifecycle(r: Ran) -> None:
    # `trifecta up` keeps its results in file://./data: no bucket, the janitor alone deletes
    assert "is not an S3 bucket" in r.stdout and "JANITOR_INTERVAL_S" in r.stdout


def test_generated_docs_are_current() -> None:
    """docs/settings.md and the bench table are what docs/build_docs.py writes from the code."""
    r = subprocess.run([sys.executable, "docs/build_docs.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_readme_links_resolve() -> None:
    """Every relative link of README.md and the docs it links points at a file in the repo."""
    import re

    from helpers.examples import pages

    for page in pages():
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
