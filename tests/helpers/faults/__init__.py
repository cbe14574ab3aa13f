"""Fault injection for tests' worker processes (see `sitecustomize.py` here): `env(...)` is the environment that turns it on."""

from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]


def env(**faults: str) -> dict[str, str]:
    """A worker environment with this directory first on PYTHONPATH and `faults` set (e.g. TRIFECTA_CRASH_CLIP="2")."""
    path = [str(HERE), str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {"PYTHONPATH": os.pathsep.join(path), **faults}
