"""`trifecta models tiny NAME DIR`: tiny random-init checkpoints written by the project itself,
loaded through exactly the production loading path (tests; offline fallback of `trifecta up`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("trifecta.tiny")

_WRITERS: dict[str, Callable[[str], str]] = {}


def register(name: str, fn: Callable[[str], str]) -> None:
    _WRITERS[name] = fn


def _segmentation(out: str) -> str:
    from workers.modelfiles import export_segformer

    return str(export_segformer(out, random_init=True, input_size=128))


register("segmentation", _segmentation)


def write_tiny(name: str, out: str) -> str:
    _load_all()
    if name not in _WRITERS:
        raise SystemExit(f"no tiny checkpoint writer for {name!r}; have: {', '.join(sorted(_WRITERS))}")
    return _WRITERS[name](out)


def ensure_model(name: str, settings: Any) -> str:
    """Make sure `trifecta up` can start `name`: nothing to do for most; families that need
    a hub checkpoint fall back to a tiny one offline (loudly) through their own hook."""
    _load_all()
    hook = _ENSURE.get(name)
    return hook(settings) if hook else f"{name}: nothing to fetch"


_ENSURE: dict[str, Callable[[Any], str]] = {}


def register_ensure(name: str, fn: Callable[[Any], str]) -> None:
    _ENSURE[name] = fn


def _load_all() -> None:
    """Model families register their writers on import."""
    import importlib

    for mod in ("workers.runners.sam3", "workers.runners.vjepa2", "workers.runners.mask2former"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def tiny_dir(base: str | Path, name: str) -> Path:
    return Path(base) / name
