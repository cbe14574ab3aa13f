"""The worker's membership in the queue system: registration, heartbeat, held messages, leaving and hand-over.

Leaving (SIGTERM: a scale-in, a rolling update): the worker deregisters at once (the API
stops routing to it and sends its sessions' calls 410), stops taking batches and stops
consuming; the running batches finish; kombu gives back what it received but never ran
(its START undone: not counted as a delivery); the messages waiting on its private queue
are handed over (`tasks.handoff`: moved to the shared queue, session calls answered 410);
it exits. Still busy after WORKER_SHUTDOWN_GRACE_S, it gives back its running work too and
exits anyway (a redelivery costs nothing: outputs are idempotent).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import orjson
import redis
from redis.exceptions import OutOfMemoryError

from tasks import handoff, keys
from workers.resources import gpu_memory_mb, rss_mb

log = logging.getLogger("trifecta.worker")


class Membership:
    """WorkerService's registration hash, heartbeat and leaving; the attributes are WorkerService's."""

    # -- memory guard (WORKER_MAX_MEMORY_MB) ----------------------------------
    def _check_memory(self) -> None:
        limit = self.settings.worker_max_memory_mb
        if not limit or self.stopping:
            return
        rss = rss_mb()
        if rss > limit:
            self.stopping = True
            log.warning("worker %s RSS %.0f MB over WORKER_MAX_MEMORY_MB=%d: finishing and exiting to be restarted", self.worker_id, rss, limit)
            threading.Thread(target=self._shutdown_soon, daemon=True).start()

    def _shutdown_soon(self) -> None:
        time.sleep(0.5)  # let this batch's acks go out
        self.leave("WORKER_MAX_MEMORY_MB")
        from celery import current_app

        current_app.control.shutdown(destination=[self.nodename])

    # -- registration and heartbeat -----------------------------------------
    def registration(self) -> dict[str, str]:
        info = self.runner.info()
        return {
            "id": self.worker_id,
            "model": self.model,
            "device": str(self.device),
            "queues": ",".join([keys.shared_queue(self.model), keys.private_queue(self.model, self.worker_id)]),
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
            "info": orjson.dumps(info).decode(),
            "heartbeat": str(time.time()),
            "in_flight": str(self.in_flight),
            "processed": str(self.processed),
            "failed": str(self.failed),
            "batches": str(self.batches),
            "rss_mb": f"{rss_mb():.1f}",
            "memory_limit_mb": f"{self.memory_limit / 1e6:.1f}",
            "gpu_memory_mb": str(gpu_memory_mb(self.device)),
            "metrics": self.metrics.registration_field(),
            **{k: f() for k, f in self.reg_fields.items()},
        }

    def held_tags(self) -> list[str]:
        c = self.consumer
        try:
            qos = c.task_consumer.channel.qos  # kombu's Redis QoS: the messages we hold unacked
            return list(qos._delivered.keys())
        except (AttributeError, RuntimeError):
            return []

    def _prune(self, age_s: float = 600.0) -> None:
        """Bookkeeping of messages that never reached a batch or an ack (requeued, shutdown)."""
        old = time.monotonic() - age_s
        with self._lock:
            for jid in [j for j, v in self.received.items() if v[2] < old]:
                del self.received[jid]
            for tag in [t for t, at in self.acked.items() if at < old]:
                del self.acked[tag]

    def beat(self) -> None:
        self._prune()
        hb = self.settings.worker_heartbeat_s
        pipe = self.r.pipeline(transaction=False)
        if not self.leaving:
            pipe.hset(keys.worker(self.worker_id), mapping=self.registration())
            pipe.expire(keys.worker(self.worker_id), max(3, int(hb * 3 + 1)))
            pipe.sadd(keys.WORKERS, self.worker_id)
        tags = self.held_tags()
        with self._lock:
            tags += list(self.drained_tags)
        if tags:
            # keep the messages we hold invisible to kombu's restore while we are alive
            pipe.zadd(self.kombu_keys.unacked_index, {t: time.time() for t in tags}, xx=True)
        if len(pipe):
            try:
                pipe.execute()
            except OutOfMemoryError:
                # at maxmemory the same (fixed-size) writes go through a script allowed to write
                # there: a worker waiting for room must not look dead (503 no_worker, its messages restored)
                reg = {} if self.leaving else self.registration()
                self.r.eval(
                    _BEAT_OOM_LUA, 3, keys.worker(self.worker_id), keys.WORKERS, self.kombu_keys.unacked_index,
                    max(3, int(hb * 3 + 1)), self.worker_id, time.time(), len(reg) * 2, *[x for kv in reg.items() for x in kv], *tags,
                )

    def heartbeat_forever(self, stop: threading.Event) -> None:
        while not stop.wait(self.settings.worker_heartbeat_s):
            try:
                self.beat()
            except redis.RedisError as e:
                log.warning("heartbeat failed (%s); retrying", e)

    def deregister(self) -> None:
        try:
            self.r.delete(keys.worker(self.worker_id))
            self.r.srem(keys.WORKERS, self.worker_id)
        except redis.RedisError:
            pass

    # -- leaving (SIGTERM, memory guard) ---------------------------------------
    def leave(self, why: str) -> None:
        """Start leaving: no new batches, deregistered now, and a deadline (WORKER_SHUTDOWN_GRACE_S).
        Celery itself stops consuming and waits for the running tasks; `hand_over` ends it.
        Takes no lock here: this runs in Celery's signal handler, which must not wait on a lock
        the code it interrupted holds; the rest runs in a thread of its own."""
        if self.leaving:
            return
        self.leaving = True
        threading.Thread(target=self._leave, args=(why, self.settings.worker_shutdown_grace_s), daemon=True, name="leaving").start()

    def _leave(self, why: str, grace: float) -> None:
        t_end = time.monotonic() + grace
        for f in self.on_leave:
            f()
        self.deregister()
        log.info("worker %s leaving (%s): deregistered; finishing %d requests in flight, then exiting (within %.0f s)", self.worker_id, why, self.in_flight, grace)
        if self.left.wait(grace):  # handed over; the process exits on its own (this thread is a daemon)
            time.sleep(max(0.0, t_end - time.monotonic()))
            log.warning("worker %s handed over its work but did not exit within WORKER_SHUTDOWN_GRACE_S; exiting now", self.worker_id)
            logging.shutdown()
            os._exit(0)
        tags = self.held_tags()
        with self._lock:
            tags += list(self.drained_tags)
        log.error("worker %s still busy %.0f s after it began leaving (WORKER_SHUTDOWN_GRACE_S): giving back the %d messages it holds and exiting", self.worker_id, grace, len(tags))
        try:
            qos = self.consumer.task_consumer.channel.qos
            for t in tags:
                qos.restore_by_tag(t)  # kombu's own restore with its own (key-prefixing) client, as at its visibility timeout
        except Exception as e:  # noqa: BLE001 - kombu restores them after VISIBILITY_TIMEOUT_S anyway
            log.warning("giving back held messages failed (%s); kombu restores them after VISIBILITY_TIMEOUT_S", e)
        self.hand_over()
        logging.shutdown()
        os._exit(1)

    def hand_over(self) -> None:
        """The last step: deregistered, and the private queue handed over (tasks.handoff)."""
        self.leaving = True
        self.deregister()
        try:
            handoff.hand_over(self.r, self.model, self.worker_id, self.kombu_keys)
        except redis.RedisError as e:  # the API hands it over when Redis is back (api.hub)
            log.warning("private queue not handed over (%s)", e)
        self.left.set()


# The heartbeat at Redis's maxmemory (noeviction refuses HSET/ZADD): `allow-oom` lets this script
# rewrite the registration (the same fields, about the same size) and the visibility of held messages.
# KEYS: worker hash, workers set, unacked_index  ARGV: ttl, worker id, now, 2n, n field/value pairs, tags...
_BEAT_OOM_LUA = """#!lua flags=allow-oom
local n = tonumber(ARGV[4])
if n > 0 then
  for i = 5, 4 + n, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  redis.call('SADD', KEYS[2], ARGV[2])
end
for i = 5 + n, #ARGV do redis.call('ZADD', KEYS[3], 'XX', ARGV[3], ARGV[i]) end
return 1
"""
