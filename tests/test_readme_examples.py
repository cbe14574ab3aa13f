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
        return [json.loads(x) for x in self.stdout.splitlines() if x.strip().startswith(("{", "["))]

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
    shutil.copytree(ROOT / "tests" / "data" / "images", box / "tests" / "data" / "images")
    (box / ".venv").parent.mkdir(parents=True, exist_ok=True)
    os.symlink(Path(sys.executable).resolve().parent.parent if (Path(sys.prefix) / "bin").is_dir() else Path(sys.prefix), box / ".venv")
    return box


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("examples")
    box = _sandbox(tmp)
    api_port, flower_port = free_port(), free_port()
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
        "ALLOWED_INPUT_ROOTS": str(box),
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
    if all(reasons):
        return False
    assert not any(reasons), f"{b.id}: split the block: it mixes commands run here with exempt ones ({[c for c, r in zip(cmds, reasons, strict=True) if r]})"
    return True


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
    key = _key_for(block)
    ran = run_block(block, live)
    assert ran.rc == 0, f"{block.id} exited {ran.rc}\n--- stdout\n{ran.stdout[-3000:]}\n--- stderr\n{ran.stderr[-3000:]}"
    allowed = EXPECT_STATUS.get(key)
    bad = [s for s in ran.statuses if (s not in allowed if allowed else s >= 400)]
    assert not bad, f"{block.id}: HTTP {bad}\n--- stdout\n{ran.stdout[-3000:]}\n--- stderr\n{ran.stderr[-3000:]}"
    CHECKS[key](ran)
