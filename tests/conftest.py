"""Real parts for every test: a Redis-protocol server on a free port, real worker and API
processes, moto's S3 server over HTTP, the real PP-OCRv4 model, real photos.

    stack = make_stack(models=["textmask"], env={"MAX_QUEUE_DEPTH": "4"})
    stack.url          # the API's base URL
    stack.workers[0]   # a Proc; .kill() sends SIGKILL
    stack.redis        # a redis.Redis on the stack's own database
"""

from __future__ import annotations

import io
import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from client.benchkit import Proc, Stack  # noqa: F401 - re-exported for tests
from tasks.embedded_redis import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "tests" / "data" / "images"  # copies of ../shared/data/images (scikit-image samples, PD/CC0)
MODEL_DIR = ROOT / "models"
_db = itertools.count(1)


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    srv = EmbeddedRedis(tmp_path_factory.mktemp("redis"), appendonly=False).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from workers.modelfiles import fetch_textmask

    fetch_textmask(str(MODEL_DIR))
    return MODEL_DIR


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    srv.start()
    yield f"http://127.0.0.1:{port}"
    srv.stop()


def make_bucket(endpoint: str, name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)


@pytest.fixture(scope="module")
def make_stack(redis_server: EmbeddedRedis, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    stacks: list[Stack] = []

    def _make(models: list[str] | tuple[str, ...] = ("textmask",), env: dict[str, str] | None = None, api: bool = True, storage: str | None = None) -> Stack:
        db = next(_db) % 16
        url = f"redis://127.0.0.1:{redis_server.port}/{db}"
        defaults = {"MAX_BATCH_SIZE": "4", "BATCH_TIMEOUT_MS": "4", "INTRA_OP_THREADS": "1"}
        st = Stack.create(url, tmp_path_factory.mktemp("stack"), env={**defaults, **(env or {})}, storage=storage, model_dir=model_dir)
        stacks.append(st)
        for i, m in enumerate(models):
            st.start_worker(m, f"{m}-{i}-{db}")
        if api:
            st.start_api()
            for m in set(models):
                st.wait_live(m)
        return st

    yield _make
    for st in stacks:
        st.stop()


# ---------------------------------------------------------------- images
def photo(name: str) -> Image.Image:
    return Image.open(IMAGES / name).convert("RGB")


def with_text(name: str = "chelsea.png") -> tuple[bytes, np.ndarray]:
    """A real photo with two lines of text drawn on it, and the text's bounding-box mask."""
    im = photo(name)
    d = ImageDraw.Draw(im)
    f = ImageFont.load_default(size=36)
    gt = np.zeros((im.size[1], im.size[0]), bool)
    for xy, text, fill in (((20, 20), "HELLO WORLD 42", (255, 255, 255)), ((40, im.size[1] - 70), "Trifecta cat", (0, 0, 0))):
        d.text(xy, text, fill=fill, font=f)
        x0, y0, x1, y1 = d.textbbox(xy, text, font=f)
        gt[max(0, y0 - 4) : y1 + 4, max(0, x0 - 4) : x1 + 4] = True
    return png_bytes(im), gt


def png_bytes(im: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    bio = io.BytesIO()
    im.save(bio, format=fmt, **kw)
    return bio.getvalue()


TERMINAL = ("succeeded", "failed", "cancelled", "expired")


def wait_job(url: str, job_id: str, timeout: float = 90, until: tuple[str, ...] = TERMINAL) -> dict:
    """Poll GET /v1/jobs/{id} until it reaches one of `until` (transient HTTP errors are retried)."""
    t_end = time.time() + timeout
    j: dict = {}
    while time.time() < t_end:
        try:
            j = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        except httpx.HTTPError:
            time.sleep(0.2)
            continue
        if j.get("status") in until:
            return j
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not finished in {timeout}s: {j}")
