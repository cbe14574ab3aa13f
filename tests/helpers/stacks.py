"""Real stacks and tiny checkpoints for tests.

ckpt = tiny_checkpoint("mask2former", tmp / "m2f")      # `trifecta models tiny NAME DIR`
st = start_stack(redis_port, model_dir, tmp, ["mask2former"], {"M2F_CHECKPOINT": str(ckpt)})
...
st.stop()
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

from client.benchkit import ROOT, Stack

DEFAULTS = {"MAX_BATCH_SIZE": "4", "BATCH_TIMEOUT_MS": "4", "INTRA_OP_THREADS": "1"}
_db = itertools.count(1)


def start_stack(
    redis_port: int, model_dir: Path, tmp: Path, models: list[str] | tuple[str, ...] = ("textmask",), env: dict[str, str] | None = None, api: bool = True, storage: str | None = None
) -> Stack:
    """Worker processes for `models` (one each) and the API, on a Redis database of their own."""
    db = next(_db) % 16
    st = Stack.create(f"redis://127.0.0.1:{redis_port}/{db}", tmp, env={**DEFAULTS, **(env or {})}, storage=storage, model_dir=model_dir)
    try:
        for i, m in enumerate(models):
            st.start_worker(m, f"{m}-{i}-{db}")
        if api:
            st.start_api()
            for m in set(models):
                st.wait_live(m)
    except BaseException:
        st.stop()
        raise
    return st


def tiny_checkpoint(name: str, out: Path) -> Path:
    """The project's own tiny random-init checkpoint of a torch family, written by its CLI."""
    r = subprocess.run([sys.executable, "-m", "client.cli", "models", "tiny", name, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "config.json").is_file()
    return out
