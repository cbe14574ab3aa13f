"""The worker's spans (tasks/tracing.py sets tracing up and draws the whole trace).

Only used while tracing is on. A batch records what each request went through (timestamps
taken around the runner's hooks and the storage writes) and, once its results are recorded,
turns them into spans with those times:

- per request, in the trace its message carried (`traceparent` in the Celery headers):
  `queue <model>` (enqueue → batch start) and `process <model>` with the children
  `decode` (runner.prepare), `model` (runner.predict), `encode` (runner.finish), `storage`;
- per batch, a trace of its own: `batch <model>`, linked to each request's `process` span,
  with one `model` span per model call; each request's `model` span links to it.

Why after the fact rather than live spans: the runner's hooks stay as they are (no tracing
code in any runner, nothing on the path when tracing is off), and a request's spans can name
their batch, whose size is known only once the batch is full.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from tasks import tracing

_current: ContextVar[BatchTrace | None] = ContextVar("trifecta_batch_trace", default=None)
Mark = tuple[str, int, int, str | None, dict[str, Any]]  # name, start ns, end ns, error, attributes


@dataclass
class _Job:
    carrier: dict[str, Any]
    marks: list[Mark] = field(default_factory=list)


class BatchTrace:
    """What one batch's requests went through, turned into spans by `emit`."""

    def __init__(self, model: str, worker: str, device: str) -> None:
        self.model, self.worker, self.device = model, worker, device
        self.jobs: dict[str, _Job] = {}
        self.model_marks: list[Mark] = []

    def carry(self, job_id: str, headers: dict[str, Any] | None) -> None:
        """A request of this batch and the headers of its message (its trace context)."""
        self.jobs[job_id] = _Job(headers or {})

    def mark(self, job_id: str, name: str, t0: int, t1: int, error: str | None = None, **attrs: Any) -> None:
        job = self.jobs.get(job_id)
        if job is not None:
            job.marks.append((name, t0, t1, error, attrs))

    @contextmanager
    def running(self) -> Iterator[None]:
        """The runner's hooks called inside this block record into this batch (this thread only)."""
        token = _current.set(self)
        try:
            yield
        finally:
            _current.reset(token)

    def storage(self, publish: Callable[[Any, Any], tuple[list[Any], dict[str, Any]]]) -> Callable[[Any, Any], tuple[list[Any], dict[str, Any]]]:
        """`publish(req, produced)` (the outputs' codec and writes), timed as the request's `storage` span."""

        def timed(q: Any, res: Any) -> tuple[list[Any], dict[str, Any]]:
            t0 = time.time_ns()
            try:
                outs, meta = publish(q, res)
            except Exception as e:
                self.mark(q.id, "storage", t0, time.time_ns(), type(e).__name__)
                raise
            self.mark(q.id, "storage", t0, time.time_ns(), None, **{"trifecta.outputs": len(outs), "trifecta.bytes": sum(o.bytes or 0 for o in outs)})
            return outs, meta

        return timed

    def emit(self, done: list[tuple[Any, str, dict[str, Any]]], t_start: float, batch_size: int) -> None:
        """Spans for the finished requests `done` ([(request, status, result or error)]) of a batch started at `t_start`."""
        from opentelemetry import trace
        from opentelemetry.trace import Link, SpanKind, Status, StatusCode

        tr = tracing.tracer()
        t0, end = int(t_start * 1e9), time.time_ns()
        base = {"trifecta.model": self.model, "trifecta.worker": self.worker, "trifecta.device": self.device, "trifecta.batch_size": batch_size}
        procs = []
        for q, status, body in done:
            job = self.jobs.get(q.id) or _Job({})
            parent = tracing.extract(job.carrier)
            created = int(q.created * 1e9)
            if created < t0:
                queued = tr.start_span(f"queue {self.model}", context=parent, start_time=created, attributes={"trifecta.job_id": q.id})
                queued.end(end_time=t0)
            attrs = {**base, "trifecta.job_id": q.id, "trifecta.tenant": q.tenant, "trifecta.kind": q.kind, "trifecta.status": status}
            span = tr.start_span(f"process {self.model}", context=parent, kind=SpanKind.CONSUMER, start_time=t0, attributes=attrs)
            if status != "succeeded":
                span.set_attribute("error.type", str(body.get("code", "internal")))
                span.set_status(Status(StatusCode.ERROR, str(body.get("message", ""))[:200]))
            procs.append((span, job))
        recording = [s.get_span_context() for s, _ in procs if s.is_recording()]
        batch_model: list[Any] = []
        if recording:  # a batch of unsampled requests leaves no trace of its own either
            batch = tr.start_span(f"batch {self.model}", start_time=t0, links=[Link(c) for c in recording], attributes=base)
            in_batch = trace.set_span_in_context(batch)
            for name, a, b, err, attrs in self.model_marks:
                s = tr.start_span(name, context=in_batch, start_time=a, attributes={**attrs, "trifecta.batch_size": batch_size})
                _end(s, b, err)
                batch_model.append(s.get_span_context())
            batch.end(end_time=end)
        for span, job in procs:
            ctx = trace.set_span_in_context(span)
            decoded = any(m[0] == "decode" and not m[3] for m in job.marks)  # it reached the model call
            marks = sorted(job.marks + (_merged_model(self.model_marks) if decoded else []), key=lambda m: m[1])
            for name, a, b, err, attrs in marks:
                links = [Link(c) for c in batch_model] if name == "model" else None
                _end(tr.start_span(name, context=ctx, start_time=a, links=links, attributes=attrs or None), b, err)
            span.end(end_time=end)

    def log_trace_id(self, job_id: str) -> str | None:
        """The trace id a request's worker log line names (its message's trace), or None."""
        job = self.jobs.get(job_id)
        if job is None:
            return None
        from opentelemetry import trace

        ctx = trace.get_current_span(tracing.extract(job.carrier)).get_span_context()
        return format(ctx.trace_id, "032x") if ctx.is_valid else None


def _merged_model(marks: list[Mark]) -> list[Mark]:
    """A request's share of the batch's model calls: one `model` span from the first call's start
    to the last one's end (several calls when a failed batched call was retried one by one)."""
    if not marks:
        return []
    err = next((m[3] for m in marks if m[3]), None)
    return [("model", min(m[1] for m in marks), max(m[2] for m in marks), err, {"trifecta.model_calls": len(marks)})]


def _end(span: Any, end_ns: int, error: str | None) -> None:
    if error:
        from opentelemetry.trace import Status, StatusCode

        span.set_attribute("error.type", error)
        span.set_status(Status(StatusCode.ERROR))
    span.end(end_time=end_ns)


def instrument(runner: Any) -> None:
    """Time the runner's prepare, predict and finish for the batch being traced (`BatchTrace.running`).
    Installed once at start and only while tracing is on, on the runner object itself, so the
    runners' code and the untraced path stay as they are; calls outside a traced batch (warm-up,
    shard jobs) pass straight through."""
    def timed(fn: Any, record: Any) -> Any:
        """`fn` as it is outside a traced batch; inside one, `record(bt, args, t0, t1, error)` after it."""

        def wrapper(*args: Any) -> Any:
            bt = _current.get()
            if bt is None:
                return fn(*args)
            t0, err = time.time_ns(), None
            try:
                return fn(*args)
            except Exception as e:
                err = type(e).__name__
                raise
            finally:
                record(bt, args, t0, time.time_ns(), err)

        return wrapper

    runner.prepare = timed(runner.prepare, lambda bt, a, t0, t1, err: bt.mark(a[0].req.id, "decode", t0, t1, err))
    runner.predict = timed(runner.predict, lambda bt, a, t0, t1, err: bt.model_marks.append(("model", t0, t1, err, {"trifecta.samples": len(a[0])})))
    runner.finish = timed(runner.finish, lambda bt, a, t0, t1, err: bt.mark(a[0].req.id, "encode", t0, t1, err))
