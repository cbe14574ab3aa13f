"""`trifecta models tiny NAME DIR`: tiny random-init checkpoints written by the project itself.

They load through exactly the production loading path (tests; offline fallback of `trifecta up`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("trifecta.tiny")


def writers() -> dict[str, str]:
    """Model name → import path of its tiny writer, as the specs declare (`ModelSpec.tiny`)."""
    from tasks.models import MODELS, tiny_writers

    return tiny_writers(MODELS.values())


def write_segmentation(out: str) -> str:
    """The segmentation model's tiny checkpoint: a random-init SegFormer exported to ONNX at 128 px."""
    from workers.modelfiles import export_segformer

    return str(export_segformer(out, random_init=True, input_size=128))


def register(name: str, fn: Callable[[str], str]) -> None:
    """Transitional: a runner module that still registers its writer (vjepa2). The spec's `tiny` is the
    one list; this only refuses a writer the spec does not name."""
    path = writers().get(name, "")
    if path.rpartition(":")[2] != getattr(fn, "__name__", None):
        raise ValueError(f"tiny writer {fn!r} for {name!r} is not the one its ModelSpec names ({path or 'none'})")


def write_tiny(name: str, out: str) -> str:
    from tasks.models import resolve

    have = writers()
    if name not in have:
        raise SystemExit(f"no tiny checkpoint writer for {name!r}; have: {', '.join(sorted(have))}")
    return resolve(have[name])(out)


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
    """Families with a tiny writer register their offline fallback (`register_ensure`) when their writer's module is imported."""
    import importlib

    for path in writers().values():
        mod = path.partition(":")[0]
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def tiny_dir(base: str | Path, name: str) -> Path:
    return Path(base) / name
