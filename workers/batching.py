"""Dynamic batching on top of celery-batches.

Gather up to MAX_BATCH_SIZE requests, wait at most BATCH_TIMEOUT_MS, and never run more
than MAX_CONCURRENCY_PER_GPU batches at once.

celery-batches (maintained, used as the base) collects messages into a buffer and flushes
the whole buffer every `flush_interval` or every `flush_every` messages. Two changes make
it a model batcher rather than a periodic one:

- a flush takes at most `flush_every` requests and only when an in-flight slot is free;
  what is left waits for the next slot, so batch size and device concurrency are bounded;
- when a batch returns, the requests that queued up meanwhile are flushed at once (the
  device never idles while work waits), and with BATCH_TIMEOUT_MS=0 a request that finds
  a free slot runs immediately (lowest latency).

When the worker stops (SIGTERM), `stop_taking()` ends the flushing: the running batches
finish, and what waits in the buffer stays unacked, so kombu gives it back to its queue
when the channel closes (workers.broker).

`take_batch` is the pure decision (a LitServe-style collector), tested without a broker.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task


def take_batch(buffer_times: list[float], now: float, max_size: int, timeout_s: float, free_slots: int, force: bool = False) -> int:
    """How many of the buffered requests (arrival times, oldest first) to run now: 0 = wait."""
    if free_slots <= 0 or not buffer_times:
        return 0
    if len(buffer_times) >= max_size or force or timeout_s <= 0 or now - buffer_times[0] >= timeout_s:
        return min(max_size, len(buffer_times))
    return 0


class AdaptiveBatches(Batches):
    abstract = True
    max_in_flight = 1

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._waiting: deque[tuple[float, Any]] = deque()
        self._in_flight = 0
        self._taking = True

    def stop_taking(self) -> None:
        """No new batch from now on (the worker is leaving); running ones finish."""
        with self._lock:
            self._taking = False

    def Strategy(self, task: Batches, app: Any, consumer: Any) -> Callable[..., None]:
        handler = super().Strategy(task, app, consumer)
        timeout = self.flush_interval

        def on_message(*args: Any, **kw: Any) -> None:
            handler(*args, **kw)  # parses the message into a Request, puts it in self._buffer
            self._drain_buffer()
            self._maybe_flush(force=timeout <= 0.0005)

        return on_message

    def _drain_buffer(self) -> None:
        now = time.monotonic()
        while True:
            try:
                req = self._buffer.get_nowait()
            except Exception:  # noqa: BLE001 - queue.Empty
                return
            with self._lock:
                self._waiting.append((now, req))

    def _do_flush(self) -> None:  # the periodic timer of celery-batches
        self._drain_buffer()
        self._maybe_flush()
        with self._lock:
            idle = not self._waiting
        if idle and self._tref is not None:  # nothing buffered: stop waking up; the next message restarts it
            self._tref.cancel()
            self._tref = None

    def _maybe_flush(self, force: bool = False, release: bool = False) -> None:
        while True:
            with self._lock:
                if release:
                    self._in_flight -= 1
                    release = False
                n = take_batch([t for t, _ in self._waiting], time.monotonic(), self.flush_every, self.flush_interval, self.max_in_flight - self._in_flight, force) if self._taking else 0
                if not n:
                    return
                batch = [self._waiting.popleft()[1] for _ in range(n)]
                self._in_flight += 1
            self._run(batch)
            force = False

    def _run(self, requests: list[Any]) -> None:
        serializable = ([SimpleRequest.from_request(r) for r in requests],)

        def on_return(result: Any) -> None:
            try:
                for r in requests:
                    if result is False:  # the batch could not even be started (broker away): give the messages back
                        r.reject(requeue=True)
                    else:
                        r.acknowledge()  # may raise while the broker is away; the messages then come back and redo idempotently
            finally:
                # a slot is free: run what queued up meanwhile without waiting for the timer
                self._maybe_flush(force=True, release=True)

        self._pool.apply_async(apply_batches_task, (self, serializable, 0, None), callback=on_return)

    def flush(self, requests: Any) -> Any:  # never used: batches go through _run
        return self._run(list(requests))
