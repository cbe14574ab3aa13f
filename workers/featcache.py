"""A small thread-safe LRU with three bounds: entries, bytes and time since last use.

SAM3 keeps an image's vision features here (tens of MB each), keyed by the image's
SHA-256, so a later request with new prompts on the same image skips the vision encoder.
`cachetools.TTLCache` bounds entries and age but not bytes, and a byte bound is the one
that matters for tensors, so this is written out (an OrderedDict and a lock).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, TypeVar

V = TypeVar("V")


class FeatureCache(Generic[V]):
    def __init__(self, *, max_entries: int, max_bytes: int, ttl_s: float, size_of: Callable[[V], int], clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries, self.max_bytes, self.ttl_s = max_entries, max_bytes, ttl_s
        self._size_of, self._clock = size_of, clock
        self._d: OrderedDict[str, tuple[V, int, float]] = OrderedDict()  # key → (value, bytes, last use)
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.evictions = self.expired = 0

    def get(self, key: str) -> V | None:
        now = self._clock()
        with self._lock:
            e = self._d.get(key)
            if e is None:
                self.misses += 1
                return None
            value, n, last = e
            if now - last > self.ttl_s:
                self._drop(key)
                self.expired += 1
                self.misses += 1
                return None
            self._d[key] = (value, n, now)
            self._d.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: V) -> bool:
        """Keep `value` unless it alone is over the byte bound; evicts least recently used entries to fit."""
        n = self._size_of(value)
        if n > self.max_bytes:
            return False
        now = self._clock()
        with self._lock:
            if key in self._d:
                self._drop(key)
            self._expire(now)
            while self._d and (len(self._d) >= self.max_entries or self.bytes + n > self.max_bytes):
                self._drop(next(iter(self._d)))
                self.evictions += 1
            self._d[key] = (value, n, now)
            self.bytes += n
            return True

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: str) -> bool:
        return key in self._d

    def stats(self) -> dict[str, Any]:
        return {
            "entries": len(self._d),
            "bytes": self.bytes,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "expired": self.expired,
            "max_entries": self.max_entries,
            "max_bytes": self.max_bytes,
            "ttl_s": self.ttl_s,
        }

    def _drop(self, key: str) -> None:
        _, n, _ = self._d.pop(key)
        self.bytes -= n

    def _expire(self, now: float) -> None:
        for k in [k for k, (_, _, last) in self._d.items() if now - last > self.ttl_s]:
            self._drop(k)
            self.expired += 1
