"""The one hook contract every model family implements (after LitServe):

    load()            load the model on the pinned device (once, at start)
    warmup()          run a dummy batch so the first request pays nothing
    prepare(item)     decode + preprocess one sample (raising fails that sample only)
    predict(batch)    ONE model call on a list of prepared samples
    finish(item, p, y) turn one prediction into masks / blobs / meta
    extra_tasks(ctx)  Celery tasks of its own beside inference (video sessions, clip jobs), none by default

`run_batch` wires them: prepares each item alone, calls predict on the survivors,
and if the batched call fails, retries items one by one so a bad sample fails alone.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from tasks.errors import ModelError, TrifectaError, internal, translate
from tasks.schemas import InferRequest
from tasks.settings import Settings
from workers.device import Device

if TYPE_CHECKING:
    import redis

    from storage.blob import BlobStore

log = logging.getLogger("trifecta.runner")


@dataclass
class Item:
    """One request inside a batch, with its input bytes already fetched."""

    req: InferRequest
    data: bytes


@dataclass
class Produced:
    """What a runner returns for one sample."""

    masks: dict[str, np.ndarray] = field(default_factory=dict)  # output key → HxW bool mask
    blobs: dict[str, tuple[bytes, str, str]] = field(default_factory=dict)  # key → (bytes, format, content type)
    meta: dict[str, Any] = field(default_factory=dict)  # small JSON: classes, scores, labels ...


@dataclass
class BatchStats:
    size: int = 0
    model_ms: float = 0.0
    prepare_ms: float = 0.0
    calls: int = 0


class TaskContext(Protocol):
    """What a runner's extra tasks may use of the worker that runs them (`workers.service.WorkerService` is one)."""

    settings: Settings
    model: str
    worker_id: str
    device: Device
    runner: Runner
    r: redis.Redis  # the worker's own (sync) Redis client: job records, replies, pub/sub
    store: BlobStore  # the worker's blob store (STORAGE_URL)
    reg_fields: dict[str, Callable[[], str]]  # extra fields of the worker's registration hash, read by the API (e.g. `sessions`)

    def beat(self) -> None:
        """Write the registration hash now (the API sees a changed `reg_fields` value at its next poll)."""
        ...


@dataclass(frozen=True)
class ExtraTask:
    """A Celery task a runner adds to its worker; the worker registers `fn` under `name` (tasks/ names it) in its threads pool."""

    name: str
    fn: Callable[..., None]
    acks_late: bool = True  # False: acked on receipt (a call whose caller waits and retries on its own)
    ignore_result: bool = True  # answers go through Redis pub/sub or the job record, never Celery's result backend


class Runner(ABC):
    """Base class; subclasses set `family` and implement the hooks."""

    family = "base"

    def __init__(self, model: str, settings: Settings, device: Device) -> None:
        self.model, self.settings, self.device = model, settings, device
        self.warm = False
        self.source = ""
        self.revision: str | None = None
        self.input_size: int | None = None
        # learned weights (True), random-init / tiny (False: its answers are meaningless and say so,
        # `X-Model-Untrained`), or not a model at all (None: echo). Set by `load` from the model's files.
        self.trained: bool | None = None
        self.calls = 0  # model calls so far (tests count them)

    # -- hooks -------------------------------------------------------------
    @abstractmethod
    def load(self) -> None: ...

    def warmup(self) -> None:
        self.warm = True

    @abstractmethod
    def prepare(self, item: Item) -> Any: ...

    @abstractmethod
    def predict(self, batch: list[Any]) -> list[Any]: ...

    @abstractmethod
    def finish(self, item: Item, prepared: Any, pred: Any) -> Produced: ...

    def dropped(self, failed: list[tuple[InferRequest, dict[str, Any]]]) -> None:
        """Requests of a batch that failed before reaching the runner: dead-lettered, past their
        deadline, input unreadable or refused; each with its error `{"code", "message", "status"}`.
        A runner whose requests are parts of a bigger job (V-JEPA 2 clips) records them there,
        so the job still finishes; by default nothing."""
        return None

    def extra_tasks(self, ctx: TaskContext) -> list[ExtraTask]:
        """Celery tasks of this family beside inference (sessions, multi-part jobs), made once at worker
        start with the worker's context; by default none."""
        return []

    def info(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "source": self.source,
            "revision": self.revision,
            "trained": self.trained,
            "input_size": self.input_size,
            "device": str(self.device),
            "warm": self.warm,
            "max_batch_size": self.settings.max_batch_size,
            "batch_timeout_ms": self.settings.batch_timeout_ms,
        }

    # -- the batch loop ----------------------------------------------------
    def predict_counted(self, batch: list[Any]) -> list[Any]:
        """`predict`, counted in `calls`: what callers that drive the hooks themselves use (`run_batch`,
        the shard pipeline, which overlaps prepare, predict and finish across threads)."""
        self.calls += 1
        return self.predict(batch)

    def run_batch(self, items: list[Item], stats: BatchStats | None = None) -> list[Produced | TrifectaError]:
        stats = stats or BatchStats()
        out: list[Produced | TrifectaError | None] = [None] * len(items)
        prepared: list[tuple[int, Any]] = []
        t0 = time.perf_counter()
        for i, it in enumerate(items):
            try:
                prepared.append((i, self.prepare(it)))
            except Exception as e:  # this sample alone fails
                out[i] = translate(e)
        t1 = time.perf_counter()
        stats.prepare_ms += (t1 - t0) * 1000
        if prepared:
            try:
                preds = self.predict_counted([p for _, p in prepared])
                stats.calls += 1
                pairs = list(zip(prepared, preds, strict=True))
            except Exception as e:
                if len(prepared) == 1:
                    out[prepared[0][0]] = _model_error(e)
                    pairs = []
                else:
                    log.warning("batched call of %d failed (%s); retrying one by one", len(prepared), e)
                    pairs = []
                    for i, p in prepared:
                        try:
                            pairs.append(((i, p), self.predict_counted([p])[0]))
                            stats.calls += 1
                        except Exception as e1:
                            out[i] = _model_error(e1)
            stats.model_ms += (time.perf_counter() - t1) * 1000
            for (i, p), y in pairs:
                try:
                    out[i] = self.finish(items[i], p, y)
                except Exception as e:
                    out[i] = translate(e)
        stats.size += len(items)
        return out  # type: ignore[return-value]


def _model_error(e: Exception) -> TrifectaError:
    if isinstance(e, TrifectaError):
        return e
    return internal(e, "the model failed on this input: an error", ModelError)


def runner_class(family: str) -> type[Runner]:
    """The Runner subclass of a family, as its ModelSpec names it (`tasks/models.py`; imported here, on use)."""
    from tasks.models import MODELS, resolve, runner_paths

    paths = runner_paths(MODELS.values())
    if family not in paths:
        raise KeyError(f"no model of family {family!r} is declared; families: {', '.join(sorted(paths))}")
    return resolve(paths[family])
