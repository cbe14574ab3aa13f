"""Real parts for every test: a Redis-protocol server on a free port, real worker and API
processes, moto's S3 server over HTTP, the real PP-OCRv4 model, real photos.

    stack = make_stack(models=["textmask"], env={"MAX_QUEUE_DEPTH": "4"})
    stack.url          # the API's base URL
    stack.workers[0]   # a Proc; .kill() sends SIGKILL
    stack.redis        # a redis.Redis on the stack's own database
"""

from __future__ import annotations

import io
import os
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from PIL import Image, ImageDraw, ImageFont

from client.benchkit import Proc, Stack  # noqa: F401 - re-exported for tests
from tasks import keys as _keys
from tasks.embedded_redis import EmbeddedRedis, free_port
from tests.helpers.stacks import start_stack

# fixtures shared by several test modules, kept as plugins in tests/helpers (no test module imports another)
pytest_plugins = ["tests.helpers.browser"]

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "tests" / "data" / "images"  # copies of ../shared/data/images (scikit-image samples, PD/CC0)
MODEL_DIR = ROOT / "models"


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
        st = start_stack(redis_server.port, model_dir, tmp_path_factory.mktemp("stack"), models, env, api, storage)
        stacks.append(st)
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


TERMINAL = tuple(sorted(_keys.TERMINAL))


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


# ---------------------------------------------------------------- a full queue, for the 503 tests
@contextmanager
def stopped(stack: Stack, worker: Proc, model: str, fresh: bool = True) -> Iterator[None]:
    """SIGSTOP a worker process for the block, then SIGCONT: its queues fill as they do behind a
    worker that cannot keep up. Its heartbeat stops too, so the block must stay well under the
    registration's life (3 × WORKER_HEARTBEAT_S + 1) and, for affinity routing, under
    2 × WORKER_HEARTBEAT_S + 1; with `fresh` it starts right after a heartbeat to have all of
    it. On exit, waits until the API lists the worker again."""
    assert worker.p is not None
    key = f"tf:worker:{worker.name}"
    last = stack.redis.hget(key, "heartbeat")
    t_end = time.time() + 15
    while fresh and stack.redis.hget(key, "heartbeat") == last:
        assert time.time() < t_end, f"{worker.name} does not beat"
        time.sleep(0.02)
    os.killpg(worker.p.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(worker.p.pid, signal.SIGCONT)
    t_end = time.time() + 15
    while worker.name not in httpx.get(f"{stack.url}/health", timeout=5).json()["queues"].get(model, {}).get("workers", []):
        assert time.time() < t_end, f"the API does not list {worker.name} again"
        time.sleep(0.1)


def fill_queue(r: redis.Redis, queue: str, model: str, n: int) -> None:
    """Bring `queue` to exactly n waiting messages: `trifecta.infer` messages built as the API
    builds them but with no job record, so a worker that reaches them skips them unrun. Topped
    up once settled: a stopped worker's BRPOP already sent to Redis still takes one of them."""
    from tasks import keys
    from tasks.schemas import InferRequest
    from tasks.wire import build_message

    def push(k: int) -> None:
        now = time.time()
        msgs = []
        for _ in range(k):
            jid = uuid.uuid4().hex
            q = InferRequest.model_validate({"id": jid, "model": model, "input": {"b64": "", "size": 0}, "deadline": now + 60, "kind": "sync", "out_prefix": f"default/jobs/{jid}", "created": now})
            msgs.append(build_message(keys.TASK_INFER, jid, {"req": q.model_dump(exclude_none=True)}, queue))
        r.lpush(queue, *msgs)

    for _ in range(5):
        if (missing := n - r.llen(queue)) > 0:
            push(missing)
        time.sleep(0.3)
        if r.llen(queue) == n:
            return
    raise AssertionError(f"{queue} holds {r.llen(queue)} messages, not {n}")


def wait_depth(url: str, model: str, at_least: int = 0, timeout: float = 10, at_most: int | None = None) -> int:
    """Wait until the API's own view (`/health`, what its 503 decision reads) has `model` at least
    `at_least` deep (or, with `at_most`, down to at most that)."""
    t_end = time.time() + timeout
    d = -1
    while time.time() < t_end:
        d = httpx.get(f"{url}/health", timeout=5).json()["queues"].get(model, {}).get("depth", 0)
        if (d <= at_most) if at_most is not None else (d >= at_least):
            return d
        time.sleep(0.05)
    want = f"at most {at_most}" if at_most is not None else f"at least {at_least}"
    raise AssertionError(f"the API saw {model} at depth {d}, not {want}")


def wait_drained(r: redis.Redis, queue: str, timeout: float = 30) -> None:
    t_end = time.time() + timeout
    while r.llen(queue):
        assert time.time() < t_end, f"{queue} still holds {r.llen(queue)} messages"
        time.sleep(0.1)


@contextmanager
def redis_paused(r: redis.Redis, seconds: float) -> Iterator[float]:
    """CLIENT PAUSE ... ALL: the server answers no client for `seconds`. Yields the monotonic
    time it answers again: a response received before then was decided without Redis."""
    r.execute_command("CLIENT", "PAUSE", int(seconds * 1000), "ALL")
    until = time.monotonic() + seconds
    try:
        yield until
    finally:
        time.sleep(max(0.0, until - time.monotonic()) + 0.05)
