"""Affinity routing: the same key (an image's hash, a session id) goes to the same worker.

A consistent-hash ring over the workers' private queues: each queue owns `replicas`
points on a 64-bit circle and a key belongs to the first point at or after its own hash.
When a worker joins or leaves, only the keys on its arcs move (about 1/N of them), so
every other worker keeps the cache or session state it already holds.

    queue = pick_queue(workers, key, model="sam3", stale_after_s=3)

`pick_queue` hashes over every registered worker (so a worker that misses a heartbeat
does not reshuffle the ring), and sends the request to the shared queue instead when the
chosen worker's heartbeat is stale: any live worker then takes it from there.

Hand-written rather than a library: the ring is thirty lines, and the packages that
offer one (uhashring, hash_ring) would be a dependency of the API for no gain.
"""

from __future__ import annotations

import bisect
import hashlib
import time
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

from tasks import keys

REPLICAS = 64


def _point(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class HashRing:
    """A consistent-hash ring over node names (here: private queue names)."""

    def __init__(self, nodes: Iterable[str], replicas: int = REPLICAS) -> None:
        self.nodes = tuple(sorted(set(nodes)))
        pts = sorted((_point(f"{n}#{i}".encode()), n) for n in self.nodes for i in range(replicas))
        self._keys = [p for p, _ in pts]
        self._owners = [n for _, n in pts]

    def node_for(self, key: str | bytes) -> str | None:
        """The node owning `key`, or None on an empty ring."""
        if not self._keys:
            return None
        h = _point(key.encode() if isinstance(key, str) else key)
        i = bisect.bisect_left(self._keys, h)
        return self._owners[i % len(self._owners)]


@lru_cache(maxsize=64)
def ring_of(nodes: tuple[str, ...]) -> HashRing:
    """Rings are rebuilt only when the set of workers changes."""
    return HashRing(nodes)


def image_key(data: bytes) -> str:
    """The key of an image for routing and for the workers' feature caches."""
    return hashlib.sha256(data).hexdigest()


def pick_queue(workers: Sequence[Any], key: str, *, model: str, stale_after_s: float, now: float | None = None) -> str:
    """The private queue of the worker that owns `key`, or the shared queue of `model`
    when no worker has a private queue or the owner's heartbeat is older than `stale_after_s`.

    `workers` are objects with `.queues` ([shared, private]) and `.heartbeat` (unix seconds),
    such as the API hub's `WorkerInfo`.
    """
    now = time.time() if now is None else now
    by_queue = {w.queues[1]: w for w in workers if len(w.queues) > 1 and w.queues[1]}
    if not by_queue:
        return keys.shared_queue(model)
    owner = ring_of(tuple(sorted(by_queue))).node_for(key)
    if owner is None or now - by_queue[owner].heartbeat > stale_after_s:
        return keys.shared_queue(model)
    return owner
