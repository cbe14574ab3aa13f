"""Per-request Celery task events (TASK_EVENTS) for Flower: buffered per batch, published every EVENTS_FLUSH_S."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from tasks import keys
from tasks.schemas import InferRequest

log = logging.getLogger("trifecta.worker")
# Task events are published every EVENTS_FLUSH_S (or at EVENTS_MAX_PENDING), not per batch: kombu's
# publish costs ~200 µs of worker CPU, about a third of a whole echo request (`trifecta bench --only events`)
EVENTS_FLUSH_S = 0.5
EVENTS_MAX_PENDING = 3000


class TaskEvents:
    """WorkerService's task-events buffer (`events` is the dispatcher, set once the worker is ready)."""

    events: Any
    _events_lock: threading.Lock
    _events_pending: int

    def _task_events(self, done: list[tuple[InferRequest, str, dict[str, Any]]], t_start: float) -> None:
        """Per request, the task events Flower counts (received, started, succeeded or failed),
        buffered after the replies are out and published by `flush_events`. Celery sends none for
        these: batches run through celery-batches (which only fires signals) and BULK_DRAIN takes
        messages past kombu's consumer. Received and started both carry the batch's start."""
        ev = self.events
        if ev is None or not done:
            return
        t_end = time.time()
        with self._events_lock:
            for q, status, body in done:
                kw = f"{{'model': {q.model!r}, 'kind': {q.kind!r}, 'format': {q.format!r}}}"
                ev.send("task-received", uuid=q.id, timestamp=t_start, name=keys.TASK_INFER, args="()", kwargs=kw, retries=0, root_id=q.id, parent_id=None, eta=None, expires=None)
                ev.send("task-started", uuid=q.id, timestamp=t_start)
                if status == "succeeded":
                    ev.send("task-succeeded", uuid=q.id, timestamp=t_end, runtime=t_end - t_start, result="")
                else:
                    ev.send("task-failed", uuid=q.id, timestamp=t_end, exception=f"{body.get('code')}: {body.get('message')}", traceback="")
            self._events_pending += 3 * len(done)
            if self._events_pending >= EVENTS_MAX_PENDING:
                self._flush_events_locked(ev)

    def flush_events(self) -> None:
        """Publish the buffered task events, all in one message (the `events` thread, every EVENTS_FLUSH_S)."""
        ev = self.events
        if ev is None:
            return
        with self._events_lock:
            self._flush_events_locked(ev)

    def _flush_events_locked(self, ev: Any) -> None:
        if not self._events_pending:
            return
        try:
            ev.flush(errors=False)
        except Exception as e:  # noqa: BLE001 - the dashboard never fails the worker; these events are lost
            log.warning("%d task events not sent (%s)", self._events_pending, e)
            for buf in getattr(ev, "_group_buffer", {}).values():  # celery's own buffer: not resent next time
                buf.clear()
        self._events_pending = 0

    def events_forever(self, stop: threading.Event) -> None:
        while not stop.wait(EVENTS_FLUSH_S):
            self.flush_events()
