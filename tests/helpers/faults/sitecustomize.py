"""Test-only fault injection for worker processes: put this directory first on a worker's PYTHONPATH.

Python imports `sitecustomize` at start-up, so a worker started with this directory on its path
gets the faults its environment asks for, and production code carries none of them:

    TRIFECTA_CRASH_CLIP=<i>   the clip of index i of any multi-clip V-JEPA 2 job kills its worker
                              (os._exit) every time it reaches `prepare`: the dead-letter tests' poison

Used by tests/test_chaos_clips.py through `tests.helpers.faults.env(...)`.
"""

from __future__ import annotations

import os
import sys


def _crash_clip(index: int) -> None:
    # The runner module is imported when the worker loads its family, after start-up: patch it
    # as soon as it is imported (a meta-path finder that wraps the module's loader).
    import importlib.abc
    import importlib.machinery

    target = "workers.runners.vjepa2"

    def patch(mod: object) -> None:
        cls = mod.VJEPA2Runner  # type: ignore[attr-defined]
        prepare = cls.prepare

        def poisoned(self, item):  # noqa: ANN001, ANN202 - the runner's own signature
            if item.req.params.get("parent") and item.req.params.get("index") == index:
                os._exit(17)
            return prepare(self, item)

        cls.prepare = poisoned

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
                patch(module)

            loader.exec_module = exec_and_patch  # type: ignore[method-assign]
            return spec

    sys.meta_path.insert(0, Finder())


if os.environ.get("TRIFECTA_CRASH_CLIP", "").isdigit():
    _crash_clip(int(os.environ["TRIFECTA_CRASH_CLIP"]))
