"""Model families declared once: a `ModelSpec` per model, from which every table of models follows.

What follows from the specs (nothing else lists models):

| table | where | from |
| --- | --- | --- |
| the model names (`--model`, `MODELS`, queues, job payloads) | `MODELS`, `MODEL_NAMES` | every spec |
| the runner class of a family | `workers/runners/base.py` `runner_class` | `runner` |
| `trifecta models tiny NAME DIR`, `trifecta up`'s offline fallback | `workers/tiny.py` | `tiny` |
| `POST /run_<model>` (route, fast path, admission) | `api/routes/sync.py` `SYNC_MODELS` | `sync` |
| the family's HTTP routers | `api/app.py` | `routes` |
| the admission gate's table | `api/admission.py` `GATED` | `sync` + `admission` |
| which `/v1/jobs` inputs a model takes | `api/routes/jobs.py` | `job_kinds` |
| the SDK's `Client.<model>(image)` shortcuts | `client/sdk` | `sdk` |
| models that need torch | `client/supervisor.py` | `torch` |

A family declared outside this file calls `register(spec)` before the tables are read, or,
for processes started by `trifecta` (API, workers, CLI), sits in a module named by the
environment variable TRIFECTA_MODEL_MODULES (comma separated) that defines `MODEL_SPECS`.
Import paths are strings ("package.module:attribute") resolved by whoever needs them
(`resolve`), so `tasks` itself never imports `api`, `workers` or torch.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

IMAGE_JOBS = ("image", "uri", "shards")  # /v1/jobs inputs of a model that takes images (api/routes/jobs.py, api/routes/shards.py)


@dataclass(frozen=True)
class Admission:
    """How the API's admission gate (`api/admission.py`) treats a model's own endpoints, before routing."""

    paths: tuple[str, ...] = ()  # POST paths that enqueue work for it: the gate checks Redis, a live worker, room
    # "module:function" (ASGI scope) -> model name | None, where the request names its model (X-Model);
    # None: the path always means this model
    pick: str | None = None
    # paths whose route answers "no live worker" itself, from memory too (a 204, a 4xx for a bad input first)
    no_worker_to_route: tuple[str, ...] = ()
    broker_only: tuple[str, ...] = ()  # path prefixes where the gate checks Redis only (session calls: the worker is known only there)


@dataclass(frozen=True)
class ModelSpec:
    """One model: its name, the family that runs it and everything the API, workers and SDK derive from it."""

    name: str
    family: str  # runner family (workers/runners/<family>.py); several models may share one (segmentation, facemask)
    takes_images: bool  # usable by the image sync endpoints and WebDataset shard jobs
    description: str
    runner: str = ""  # "module:Class" of its Runner subclass (default: workers.runners.<family>:Runner)
    tiny: str | None = None  # "module:function" (out_dir) -> path writing a tiny random-init checkpoint
    sync: bool = False  # served at POST /run_<name>
    routes: tuple[str, ...] = ()  # "module:router" APIRouters of its own endpoints, included by api/app.py
    admission: Admission = Admission()
    job_kinds: tuple[str, ...] | None = None  # /v1/jobs input kinds it takes (default: IMAGE_JOBS when it takes images)
    torch: bool = False  # its worker needs torch (`trifecta up` refuses it on an ONNX-only install; the worker-torch image)
    sdk: bool = False  # the SDK gets `Client.<name>(image)` / `AsyncClient.<name>(image)` (sync models only)

    @property
    def runner_path(self) -> str:
        return self.runner or f"workers.runners.{self.family}:Runner"

    @property
    def jobs(self) -> tuple[str, ...]:
        if self.job_kinds is not None:
            return self.job_kinds
        return IMAGE_JOBS if self.takes_images else ()


_ONNXSEG = "workers.runners.onnxseg:OnnxSegRunner"
_SAM3_IMAGE = ("/api/v1/image/segment", "/api/v1/image/cached-features")
BUILTIN: tuple[ModelSpec, ...] = (
    ModelSpec(
        "segmentation",
        "onnxseg",
        True,
        "ONNX semantic segmentation (SegFormer export); foreground = argmax != background",
        runner=_ONNXSEG,
        tiny="workers.tiny:write_segmentation",
        sync=True,
        sdk=True,
    ),
    ModelSpec(
        "textmask",
        "textdet",
        True,
        "PP-OCRv4 text detection (pretrained, ONNX) as RapidOCR runs it; filled text regions + their quadrilaterals",
        runner="workers.runners.textdet:TextDetRunner",
        sync=True,
        sdk=True,
    ),
    # /run_facemask answers 204 while no worker serves it (the source contract): its route says so, not the gate
    ModelSpec(
        "facemask",
        "onnxseg",
        True,
        "ONNX face mask; answers 204 until a model is served",
        runner=_ONNXSEG,
        sync=True,
        admission=Admission(no_worker_to_route=("/run_facemask",)),
        sdk=True,
    ),
    ModelSpec(
        "sam3",
        "sam3",
        True,
        "SAM3 (Segment Anything 3) with text and box prompts, video sessions",
        runner="workers.runners.sam3:Sam3Runner",
        tiny="workers.runners.sam3:write_tiny",
        torch=True,
        routes=("api.routes.sam3_image:router", "api.routes.sam3_video:router"),
        # the image endpoints answer a bad image or prompt (4xx) whether or not a sam3 worker runs
        admission=Admission(paths=_SAM3_IMAGE, no_worker_to_route=_SAM3_IMAGE, broker_only=("/api/v1/video/",)),
    ),
    ModelSpec(
        "vjepa2",
        "vjepa2",
        False,
        "V-JEPA 2 video classification on 16-frame clips",
        runner="workers.runners.vjepa2:VJEPA2Runner",
        tiny="workers.runners.vjepa2:write_tiny",
        torch=True,
        routes=("api.routes.vjepa2:router",),
        admission=Admission(paths=("/api/v1/infer",)),
        job_kinds=("video", "frames"),
    ),
    ModelSpec(
        "mask2former",
        "mask2former",
        True,
        "Mask2Former multi-class semantic segmentation",
        runner="workers.runners.mask2former:Mask2FormerRunner",
        tiny="workers.runners.mask2former:write_tiny",
        torch=True,
        routes=("api.routes.mask2former:router",),
        admission=Admission(paths=("/segment", "/segment-batch"), pick="api.routes.mask2former:gate_model"),
    ),
    ModelSpec("echo", "echo", True, "no-op model for measurement and tests", runner="workers.runners.echo:EchoRunner", sync=True),
    ModelSpec(
        "simulated",
        "simulated",
        True,
        "textmask's decode and mask encoding around a model call that sleeps SIM_BATCH_MS + SIM_IMAGE_MS x n (a GPU's cost shape, no CPU): measures what one worker's host side can feed a device",
        runner="workers.runners.simulated:SimulatedRunner",
        sync=True,
    ),
)

MODELS: dict[str, ModelSpec] = {}


def check(spec: ModelSpec, others: Mapping[str, ModelSpec]) -> None:
    """Refuse a spec that would make the derived tables ambiguous (a clear error at import, not a wrong route later)."""
    if not spec.name or not spec.name.replace("_", "").isalnum() or spec.name != spec.name.lower():
        raise ValueError(f"model name {spec.name!r}: lower-case letters, digits and '_' only (it names a queue and /run_<name>)")
    if spec.name in others:
        raise ValueError(f"model {spec.name!r} is declared twice")
    if spec.sdk and not spec.sync:
        raise ValueError(f"model {spec.name!r}: an SDK shortcut needs a sync endpoint (sync=True)")
    for o in others.values():
        if o.family == spec.family and o.runner_path != spec.runner_path:
            raise ValueError(f"family {spec.family!r}: model {spec.name!r} names runner {spec.runner_path}, model {o.name!r} names {o.runner_path}")
        for p in set(spec.admission.paths) & set(o.admission.paths):
            if spec.admission.pick is None or spec.admission.pick != o.admission.pick:
                raise ValueError(f"path {p} is gated for both {o.name!r} and {spec.name!r} without one `pick` that chooses between them")


def register(spec: ModelSpec) -> ModelSpec:
    """Add a model. Call it before the API, a worker or the CLI reads the tables (at import of its module)."""
    check(spec, MODELS)
    MODELS[spec.name] = spec
    global MODEL_NAMES
    MODEL_NAMES = tuple(MODELS)
    return spec


def resolve(path: str) -> Any:
    """The object an import path "package.module:attribute" names (runners, routers, writers: imported when used)."""
    mod, sep, attr = path.partition(":")
    if not sep or not mod or not attr:
        raise ValueError(f"import path {path!r} must look like 'package.module:attribute'")
    return getattr(importlib.import_module(mod), attr)


# -- the derived tables (pure functions of a spec collection, so tests can check them for any set)
def sync_models(specs: Iterable[ModelSpec]) -> tuple[str, ...]:
    return tuple(s.name for s in specs if s.sync)


def router_paths(specs: Iterable[ModelSpec]) -> tuple[str, ...]:
    """Each family router once, in declaration order."""
    return tuple(dict.fromkeys(r for s in specs for r in s.routes))


def tiny_writers(specs: Iterable[ModelSpec]) -> dict[str, str]:
    return {s.name: s.tiny for s in specs if s.tiny}


def runner_paths(specs: Iterable[ModelSpec]) -> dict[str, str]:
    return {s.family: s.runner_path for s in specs}


def sdk_models(specs: Iterable[ModelSpec]) -> tuple[str, ...]:
    return tuple(s.name for s in specs if s.sdk)


def gated_paths(specs: Iterable[ModelSpec]) -> dict[str, tuple[str, str | None]]:
    """POST path → (model, pick): what the admission gate checks before routing."""
    out: dict[str, tuple[str, str | None]] = {}
    for s in specs:
        if s.sync:
            out[f"/run_{s.name}"] = (s.name, None)
        for p in s.admission.paths:
            out.setdefault(p, (s.name, s.admission.pick))
    return out


def no_worker_to_route(specs: Iterable[ModelSpec]) -> frozenset[str]:
    return frozenset(p for s in specs for p in s.admission.no_worker_to_route)


def broker_only(specs: Iterable[ModelSpec]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(p for s in specs for p in s.admission.broker_only))


# what `make up` / `trifecta up` serve without MODELS: the pretrained text detector (real masks on
# the first request, no torch needed) and the free no-op model; an untrained model runs only when asked for
DEFAULT_MODELS: tuple[str, ...] = ("textmask", "echo")
MODEL_NAMES: tuple[str, ...] = ()
for _spec in BUILTIN:
    register(_spec)


def _load_modules() -> None:
    """Families that live outside this repository's table: TRIFECTA_MODEL_MODULES names modules defining
    `MODEL_SPECS`. An environment variable, not a Settings field: the settings validate MODELS against
    these names, so the names must be known before any settings exist."""
    for name in filter(None, (m.strip() for m in os.environ.get("TRIFECTA_MODEL_MODULES", "").split(","))):
        for spec in getattr(importlib.import_module(name), "MODEL_SPECS", ()):
            if MODELS.get(spec.name) != spec:
                register(spec)


_load_modules()
