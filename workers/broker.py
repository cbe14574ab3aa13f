"""kombu's Redis transport, with the worker's own bookkeeping riding in kombu's round trips.

Why a subclass and not a fork: kombu's consumer (BRPOP, unacked records, restore after
the visibility timeout) stays exactly as it is; two of its Redis round trips simply carry
more commands, so the hot path of a request costs the same number of round trips as a
bare Celery task:

- `QoS.append` (kombu records a popped message as unacked: ZADD + HSET) also runs the
  worker's START script for an inference message (count the delivery, mark the job
  running, refuse finished or cancelled jobs, dead-letter past MAX_DELIVERIES) and reads
  the shared queue's length (a batch that finds it empty skips the BULK_DRAIN round trip);
- `QoS.ack` skips its ZREM + HDEL for a message whose ack already rode in the batch's
  FINISH pipeline (the one that records the results and publishes them).

And once, at shutdown: before kombu gives back the messages the worker received but never
ran (`QoS.restore_unacked`, when the channel closes), the hook undoes their START.

At Redis's maxmemory (noeviction) the unacked record of a message kombu has just popped is
refused; kombu would raise and the message, held only in this process, would be lost. The
append is retried instead until Redis has room (the API refuses new work meanwhile, so room
comes as results expire): the consumer waits, the message stays ours.

Our own scripts (the BULK_DRAIN top-up, FINISH's acks, the heartbeat) write kombu's unacked
records with a plain redis client: `KombuKeys` gives them kombu's key names as the channel's
options spell them, `global_keyprefix` included, so they never hard-code `unacked`.

The worker installs its hook with `install(...)`; without one, this is kombu's transport.
Selected by `broker_transport` in the worker's Celery app (tasks.celery_app.make_app), so
the broker URL stays a plain redis:// URL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from time import sleep, time
from typing import Any, Protocol

from kombu.transport import redis as kredis
from kombu.transport.virtual import base as vbase
from kombu.utils.json import dumps
from redis.exceptions import OutOfMemoryError

TRANSPORT = "workers.broker:Transport"
log = logging.getLogger("trifecta.worker")


class Hook(Protocol):
    def on_receive(self, pipe: Any, message: Any, delivery_tag: str) -> Callable[[list[Any]], None] | None:
        """Queue commands on kombu's append pipeline; return what takes their results (or None)."""

    def acked_already(self, delivery_tag: str) -> bool:
        """True when the batch's FINISH pipeline already removed this message's unacked records."""

    def on_give_back(self, delivery_tags: list[str]) -> None:
        """These messages are about to go back to their queues unrun (the worker is stopping)."""


_hook: Hook | None = None


@dataclass(frozen=True)
class KombuKeys:
    """kombu's Redis names for a client that does not prefix keys (ours): `global_keyprefix` applied."""

    prefix: str = ""
    unacked: str = kredis.Channel.unacked_key
    unacked_index: str = kredis.Channel.unacked_index_key

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> KombuKeys:
        """As kombu's Redis channel reads them from `broker_transport_options` (its class defaults otherwise)."""
        p = options.get("global_keyprefix") or kredis.Channel.global_keyprefix
        return cls(p, p + options.get("unacked_key", kredis.Channel.unacked_key), p + options.get("unacked_index_key", kredis.Channel.unacked_index_key))

    @classmethod
    def of(cls, channel: Any) -> KombuKeys:
        """Read off a live kombu Redis channel (what its own QoS uses)."""
        p = channel.global_keyprefix or ""
        return cls(p, p + channel.unacked_key, p + channel.unacked_index_key)

    def queue(self, name: str) -> str:
        """The Redis key of kombu's queue `name` (kombu's prefixing client adds the prefix to its list commands)."""
        return self.prefix + name

    def drain(self, queue: str, room: int, now: float, task: str) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of tasks.wire.DRAIN_LUA topping up from kombu's queue `queue`."""
        return [self.queue(queue), self.unacked, self.unacked_index], [room, now, task, queue]


def install(hook: Hook | None) -> None:
    global _hook
    _hook = hook


class QoS(kredis.QoS):
    _client: Any = None

    def append(self, message: Any, delivery_tag: str) -> None:
        hook = _hook
        if hook is None:
            super().append(message, delivery_tag)
            return
        delivery = message.delivery_info
        # one client per channel, as kombu's own would be (its pipe_or_acquire builds a new
        # redis.Redis per call: measured 8 % of a worker's CPU per echo request); same pool
        if self._client is None:
            self._client = self.channel._create_client()
        attempt = 0
        while True:
            pipe = self._client.pipeline()
            # kombu's own two commands, unchanged (MULTI/EXEC as kombu sends them)
            pipe.zadd(self.unacked_index_key, {delivery_tag: time()}).hset(self.unacked_key, delivery_tag, dumps([message._raw, delivery["exchange"], delivery["routing_key"]]))
            take = hook.on_receive(pipe, message, delivery_tag)
            try:
                res = pipe.execute(raise_on_error=False)
                break
            except OutOfMemoryError:  # MULTI refused whole at maxmemory: nothing written, the message is still only ours
                if attempt % 20 == 0:
                    log.warning("Redis is at its maxmemory: a received message waits for room to be recorded (retrying)")
                sleep(min(2.0, 0.1 * (attempt + 1)))
                attempt += 1
        for r in res[:2]:
            if isinstance(r, Exception):  # kombu's record itself failed: as kombu would, raise
                raise r
        if take is not None:
            take(res[2:])  # the hook copes with its own errors (the batch then starts the job itself)
        vbase.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        hook = _hook
        if hook is not None and hook.acked_already(delivery_tag):
            vbase.QoS.ack(self, delivery_tag)  # local bookkeeping only: Redis already has it
            return
        super().ack(delivery_tag)


    def restore_unacked(self, client: Any = None) -> None:
        hook = _hook
        if hook is not None and self._delivered:
            try:
                hook.on_give_back(list(self._delivered))
            except Exception as e:  # noqa: BLE001 - the messages go back all the same
                log.warning("giving back %d messages: %s", len(self._delivered), e)
        super().restore_unacked(client)


class Channel(kredis.Channel):
    QoS = QoS


class Transport(kredis.Transport):
    Channel = Channel
