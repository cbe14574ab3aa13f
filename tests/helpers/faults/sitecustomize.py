"""Test-only fault injection for worker processes: put this directory first on a worker's PYTHONPATH.

Python imports `sitecustomize` at start-up, so a worker started with this directory on its path
gets the faults its environment asks for, and production code carries none of them:

    TRIFECTA_CRASH_CLIP=<i>   the clip of index i of any multi-clip V-JEPA 2 job kills its worker
                              (os._exit) every time it reaches `prepare`: the dead-letter tests' poison
    TRIFECTA_CRASH_ECHO=1     an `echo` request with `params.crash` kills its worker the same way

Used by tests/test_chaos_clips.py and tests/test_chaos.py through `tests.helpers.faults.env(...)`.
"""

from __future__ import annotations

import os
import sys


def _patch_on_import(target: str, patch: object) -> None:
    """Call `patch(module)` once `target` is imported (runner modules load after start-up, when the
    worker picks its family): a meta-path finder that wraps the module's loader."""
    import importlib.abc
    import importlib.machinery

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target_=None):  # noqa: ANN001, ANN201
            if name != target:
                return None
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            loader = spec.loader
            exec_module = loader.exec_module

            def exec_and_patch(module):  # noqa: ANN001, ANN202
                exec_module(module)
                patch(module)  # type: ignore[operator]

            loader.exec_module = exec_and_patch  # type: ignore[method-assign]
            return spec

    sys.meta_path.insert(0, Finder())


def _poison_prepare(target: str, cls_name: str, when: object) -> None:
    def patch(mod: object) -> None:
        cls = getattr(mod, cls_name)
        prepare = cls.prepare

        def poisoned(self, item):  # noqa: ANN001, ANN202 - the runner's own signature
            if when(item):  # type: ignore[operator]
                os._exit(17)
            return prepare(self, item)

        cls.prepare = poisoned

    _patch_on_import(target, patch)


if os.environ.get("TRIFECTA_CRASH_CLIP", "").isdigit():
    _clip = int(os.environ["TRIFECTA_CRASH_CLIP"])
    _poison_prepare("workers.runners.vjepa2", "VJEPA2Runner", lambda item: item.req.params.get("parent") and item.req.params.get("index") == _clip)

if os.environ.get("TRIFECTA_CRASH_ECHO") == "1":
    _poison_prepare("workers.runners.echo", "EchoRunner", lambda item: bool(item.req.params.get("crash")))
