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
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from PIL import Image, ImageDraw, ImageFont

from tasks.embedded_redis import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT.parent / "shared" / "data" / "images"
if not IMAGES.is_dir():  # a clone elsewhere: the photos are copied into the repo's test data
    IMAGES = ROOT / "tests" / "data" / "images"
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


@dataclass
class Proc:
    name: str
    cmd: list[str]
    env: dict[str, str]
    log: Path
    p: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self.p = subprocess.Popen(self.cmd, env=self.env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        return self

    def kill(self) -> None:
        if self.p and self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait(10)

    def stop(self) -> None:
        if self.p and self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def alive(self) -> bool:
        return bool(self.p and self.p.poll() is None)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class Stack:
    env: dict[str, str]
    tmp: Path
    redis: redis.Redis
    url: str = ""
    api: Proc | None = None
    workers: list[Proc] = field(default_factory=list)

    def start_worker(self, model: str, name: str, env: dict[str, str] | None = None, wait: bool = True) -> Proc:
        e = {**self.env, **(env or {})}
        w = Proc(name, [sys.executable, "-m", "client.cli", "worker", "--model", model, "--name", name], e, self.tmp / f"worker-{name}.log").start()
        self.workers.append(w)
        if wait:
            self.wait_worker(name, w)
        return w

    def wait_worker(self, name: str, w: Proc, timeout: float = 90) -> None:
        t_end = time.time() + timeout
        while time.time() < t_end:
            if self.redis.exists(f"tf:worker:{name}") and b"ready" in (w.log.read_bytes() if w.log.exists() else b""):
                return
            if not w.alive():
                raise RuntimeError(f"worker {name} died:\n{w.tail()}")
            time.sleep(0.1)
        raise RuntimeError(f"worker {name} not ready in {timeout}s:\n{w.tail()}")

    def start_api(self, env: dict[str, str] | None = None) -> str:
        port = free_port()
        e = {**self.env, **(env or {})}
        self.api = Proc("api", [sys.executable, "-m", "client.cli", "api", "--port", str(port)], e, self.tmp / "api.log").start()
        self.url = f"http://127.0.0.1:{port}"
        t_end = time.time() + 30
        while time.time() < t_end:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code in (200, 503):
                    return self.url
            except httpx.HTTPError:
                pass
            if not self.api.alive():
                raise RuntimeError(f"api died:\n{self.api.tail()}")
            time.sleep(0.1)
        raise RuntimeError("api did not start")

    def wait_live(self, model: str, n: int = 1, timeout: float = 10) -> None:
        """Until the API sees n live workers of model."""
        t_end = time.time() + timeout
        while time.time() < t_end:
            h = httpx.get(self.url + "/health", timeout=2).json()
            if len(h.get("queues", {}).get(model, {}).get("workers", [])) >= n:
                return
            time.sleep(0.1)
        raise RuntimeError(f"API does not see {n} {model} worker(s)")

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        if self.api:
            self.api.stop()


@pytest.fixture(scope="module")
def make_stack(redis_server: EmbeddedRedis, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    stacks: list[Stack] = []

    def _make(models: list[str] | tuple[str, ...] = ("textmask",), env: dict[str, str] | None = None, api: bool = True, storage: str | None = None) -> Stack:
        db = next(_db) % 16
        url = f"redis://127.0.0.1:{redis_server.port}/{db}"
        r = redis.Redis.from_url(url)
        r.flushdb()
        tmp = tmp_path_factory.mktemp("stack")
        base = {
            **os.environ,
            "REDIS_URL": url,
            "STORAGE_URL": storage or f"file://{tmp / 'data'}",
            "MODEL_DIR": str(model_dir),
            "MAX_BATCH_SIZE": "4",
            "BATCH_TIMEOUT_MS": "4",
            "WORKER_HEARTBEAT_S": "1",
            "INTRA_OP_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        st = Stack(env=base, tmp=tmp, redis=r)
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
