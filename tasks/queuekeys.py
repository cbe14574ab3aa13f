"""Queue name → Redis key: the one place that knows how kombu's Redis transport names its keys.

Everything outside Celery/kombu that touches a queue list (the API's LPUSH and LLEN, the
hand-over of a departed worker's queue, the metrics' queue depths, the workers' bulk drain
and their own pushes) names the queue as Celery does (`textmask`, `sam3.<worker-id>`; see
tasks/keys.py) and turns it into the Redis key here, at the Redis call. Message fields keep
the plain name (the envelope's `routing_key`, a registration's `queues`): kombu compares and
restores by it.

How kombu 5.7's Redis transport (`kombu/transport/redis.py`) spells its keys, all from the
channel's transport options (`broker_transport_options`, built by
`tasks.celery_app.transport_options`):

- `global_keyprefix` (default ""): its `PrefixedStrictRedis` client prepends it to the key of
  LPUSH/RPUSH/RPOP/LLEN/BRPOP/HSET/ZADD/... — queue lists, `unacked`, `unacked_index`, the
  `_kombu.binding.*` sets — so in Redis every kombu key carries it. Our clients are plain
  redis clients: they add it themselves, through `QueueKeys`.
- a queue's priority lists: `Channel._q_for_pri` — priority 0 is the queue's own name, a
  higher step `<name><sep><step>` (`sep` default "\\x06\\x16", `priority_steps` default
  [0, 3, 6, 9]). Our messages carry priority 0 (tasks/wire.py), so pushes and the hot-path
  depth reads use the plain list; `all_lists` gives every step, as kombu's own `_size` sums.
- `unacked_key` / `unacked_index_key` (defaults `unacked`, `unacked_index`).

`tests/test_wire.py` checks these names against a live kombu channel's own writes.
"""

from __future__ import annotations

from bisect import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kombu.transport import redis as kredis

from tasks.celery_app import transport_options
from tasks.settings import Settings

# the kombu release whose key naming this module mirrors (pyproject pins it exactly)
KOMBU_VERSION = "5.7.0"


@dataclass(frozen=True)
class QueueKeys:
    """kombu's Redis key names for a client that does not prefix keys (ours): `global_keyprefix` applied."""

    prefix: str = ""
    unacked: str = kredis.Channel.unacked_key
    unacked_index: str = kredis.Channel.unacked_index_key
    sep: str = kredis.Channel.sep
    priority_steps: Sequence[int] = field(default=tuple(kredis.PRIORITY_STEPS))

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> QueueKeys:
        """As kombu's Redis channel reads them from `broker_transport_options` (its class defaults otherwise)."""
        p = options.get("global_keyprefix") or kredis.Channel.global_keyprefix
        return cls(
            p,
            p + options.get("unacked_key", kredis.Channel.unacked_key),
            p + options.get("unacked_index_key", kredis.Channel.unacked_index_key),
            options.get("sep", kredis.Channel.sep),
            tuple(options.get("priority_steps", kredis.PRIORITY_STEPS)),
        )

    @classmethod
    def of(cls, channel: Any) -> QueueKeys:
        """Read off a live kombu Redis channel (what its own QoS and `_put` use)."""
        p = channel.global_keyprefix or ""
        return cls(p, p + channel.unacked_key, p + channel.unacked_index_key, channel.sep, tuple(channel.priority_steps))

    def queue(self, name: str, priority: int = 0) -> str:
        """The Redis key of kombu's queue `name` at `priority` (kombu's `_q_for_pri`, then its client's prefix)."""
        pri = self.priority_steps[bisect(self.priority_steps, priority) - 1]
        return self.prefix + (f"{name}{self.sep}{pri}" if pri else name)

    def all_lists(self, name: str) -> list[str]:
        """Every priority list of queue `name`: its length is their sum (kombu's `Channel._size`)."""
        return [self.queue(name, p) for p in self.priority_steps]

    def drain(self, queue: str, room: int, now: float, task: str) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of tasks.wire.DRAIN_LUA topping up from kombu's queue `queue`."""
        return [self.queue(queue), self.unacked, self.unacked_index], [room, now, task, queue]


def for_settings(settings: Settings) -> QueueKeys:
    """The key names of the Celery app `tasks.celery_app.make_app(settings)` builds (same transport options)."""
    return QueueKeys.from_options(transport_options(settings))
