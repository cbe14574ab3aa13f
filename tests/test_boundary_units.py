"""Unit tests of the queue boundary's moving parts, each alone: the batcher's top-up
(workers/batching.py), the QoS hooks in kombu's round trips (workers/broker.py) and the
API's view of queues and workers (api/hub.py `Hub.refresh`). Redis is the session's real
one (a database of its own per test); no Celery worker, no API process.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection

from tasks import keys
from tasks.settings import Settings
from tasks.wire import build_message
from workers import broker
from workers.batching import AdaptiveBatches

TASK = keys.TASK_INFER


def _url(redis_server: Any, db: int) -> str:
    return f"redis://127.0.0.1:{redis_server.port}/{db}"


# ---------------------------------------------------------------- batch top-up (workers/batching.py)
class _Req:
    """What celery-batches buffers per message: the fields SimpleRequest copies, and the ack calls."""

    def __init__(self, n: int) -> None:
        self.id, self.name, self._payload = f"r{n}", TASK, ((), {"n": n}, {})
        self.delivery_info, self.hostname, self.ignore_result = {}, "test", True
        self.reply_to = self.correlation_id = None
        self.request_dict: dict[str, Any] = {}
        self.acked = False
        self.requeued = False

    def acknowledge(self) -> None:
        self.acked = True

    def reject(self, requeue: bool = False) -> None:
        self.requeued = requeue


class _Pool:
    """Celery's pool as the batcher uses it: the batch is handed over, its callback fired later by the test."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], Any]] = []

    def apply_async(self, fn: Any, args: tuple[Any, ...], callback: Any) -> None:
        _task, (reqs,), *_ = args
        self.calls.append(([r.kwargs["n"] for r in reqs], callback))


class _Timer:
    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _Batcher(AdaptiveBatches):
    name = "test.batches"
    flush_every = 4  # MAX_BATCH_SIZE
    flush_interval = 3600.0  # BATCH_TIMEOUT_MS: never reached in this test, so only size and freed slots flush
    max_in_flight = 1  # MAX_CONCURRENCY_PER_GPU


def _arrive(b: _Batcher, reqs: list[_Req]) -> None:
    """A message's arrival, as the batcher's Strategy handles it (after celery-batches buffered it)."""
    for r in reqs:
        b._buffer.put(r)
    b._drain_buffer()
    b._maybe_flush()


def test_batcher_tops_up_from_what_queued_while_a_batch_ran() -> None:
    b = _Batcher()
    b._pool = pool = _Pool()
    reqs = [_Req(n) for n in range(12)]
    _arrive(b, reqs[:3])
    assert pool.calls == []  # 3 < MAX_BATCH_SIZE and the timeout is far: they wait
    _arrive(b, reqs[3:5])
    assert [c[0] for c in pool.calls] == [[0, 1, 2, 3]]  # full: one batch of 4, the fifth waits
    _arrive(b, reqs[5:9])  # 5 wait now: more than a batch, but the only slot is busy
    assert len(pool.calls) == 1 and b._in_flight == 1 and len(b._waiting) == 5

    pool.calls[0][1](True)  # the batch returns: its messages are acked, and the freed slot runs the next at once
    assert [r.acked for r in reqs[:4]] == [True] * 4 and not any(r.acked for r in reqs[4:])
    assert [c[0] for c in pool.calls] == [[0, 1, 2, 3], [4, 5, 6, 7]] and b._in_flight == 1 and len(b._waiting) == 1

    pool.calls[1][1](False)  # the batch could not start (broker away): its messages go back to the queue
    assert [r.requeued for r in reqs[4:8]] == [True] * 4 and not any(r.acked for r in reqs[4:8])
    assert [c[0] for c in pool.calls][2] == [8]  # the freed slot takes the one left, without waiting for the timer
    assert b._in_flight == 1 and not b._waiting

    b.stop_taking()  # the worker is leaving: what arrives now stays buffered (unacked: kombu gives it back)
    pool.calls[2][1](True)
    _arrive(b, reqs[9:12])
    b._maybe_flush(force=True)
    assert len(pool.calls) == 3 and b._in_flight == 0 and len(b._waiting) == 3
    assert not any(r.acked or r.requeued for r in reqs[9:])


def test_batcher_timer_stops_when_nothing_waits_and_zero_timeout_runs_alone() -> None:
    b = _Batcher()
    b._pool = pool = _Pool()
    b._tref = timer = _Timer()
    b._do_flush()  # the periodic flush with nothing buffered stops the timer (the next message restarts it)
    assert timer.cancelled and b._tref is None and pool.calls == []
    b.flush_interval = 0  # BATCH_TIMEOUT_MS=0: a request that finds a free slot runs alone, at once
    _arrive(b, [_Req(0)])
    _arrive(b, [_Req(1), _Req(2)])  # the slot is busy: these wait for it
    assert [c[0] for c in pool.calls] == [[0]]
    pool.calls[0][1](True)
    assert [c[0] for c in pool.calls] == [[0], [1, 2]]


# ---------------------------------------------------------------- QoS hooks (workers/broker.py)
class _Hook:
    """Records what kombu's round trips hand the worker, and rides one command of its own in each."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str, list[Any]]] = []
        self.done: set[str] = set()
        self.given_back: list[list[str]] = []

    def on_receive(self, pipe: Any, message: Any, delivery_tag: str) -> Any:
        pipe.incr("hooked")
        pipe.llen("q")

        def take(res: list[Any]) -> None:
            self.received.append((message.headers["id"], delivery_tag, res))

        return take

    def acked_already(self, delivery_tag: str) -> bool:
        return delivery_tag in self.done

    def on_give_back(self, delivery_tags: list[str]) -> None:
        self.given_back.append(sorted(delivery_tags))


@pytest.fixture
def hooked(redis_server: Any) -> Iterator[tuple[redis.Redis, Connection, _Hook]]:
    url = _url(redis_server, 9)
    r = redis.Redis.from_url(url)
    r.flushdb()
    hook = _Hook()
    broker.install(hook)
    try:
        with Connection(url, transport=broker.Transport) as conn:
            yield r, conn, hook
    finally:
        broker.install(None)
        r.flushdb()


def _push(r: redis.Redis, n: int) -> list[tuple[str, str]]:
    """n messages on queue `q` (oldest popped first); their (job id, delivery tag)."""
    out = []
    for _ in range(n):
        jid = uuid.uuid4().hex
        raw = build_message(TASK, jid, {"req": {"id": jid}}, "q")
        r.lpush("q", raw)
        out.append((jid, json.loads(raw)["properties"]["delivery_tag"]))
    return out


def test_qos_hook_rides_in_kombus_unacked_record_round_trip(hooked) -> None:
    r, conn, hook = hooked
    sent = _push(r, 3)
    ch = conn.default_channel
    assert isinstance(ch.qos, broker.QoS)
    m = ch.basic_get("q", no_ack=False)
    # the hook's commands ran in the same MULTI as kombu's record, and their results came back to it
    assert hook.received == [(sent[0][0], sent[0][1], [1, 2])]
    assert m.delivery_tag == sent[0][1]
    rec = json.loads(r.hget(ch.unacked_key, m.delivery_tag))
    assert rec[1:] == ["", "q"] and rec[0]["headers"]["id"] == sent[0][0]  # kombu's own record, unchanged
    assert r.zscore(ch.unacked_index_key, m.delivery_tag) is not None

    m.ack()  # not acked by a FINISH pipeline: kombu's own ZREM + HDEL run
    assert r.hget(ch.unacked_key, m.delivery_tag) is None and r.zscore(ch.unacked_index_key, m.delivery_tag) is None

    m2 = ch.basic_get("q", no_ack=False)
    assert hook.received[-1][:2] == sent[1] and hook.received[-1][2] == [2, 1]
    hook.done.add(m2.delivery_tag)  # FINISH already removed its records: kombu's ack must not touch Redis
    m2.ack()
    assert r.hget(ch.unacked_key, m2.delivery_tag) is not None  # untouched by the ack (here no FINISH removed it, so it stays)
    assert m2.delivery_tag in ch.qos._dirty  # but kombu's local bookkeeping took the ack (its prefetch count frees up)


def test_qos_give_back_tells_the_hook_before_kombu_restores(hooked) -> None:
    r, conn, hook = hooked
    sent = _push(r, 2)
    ch = conn.default_channel
    got = [ch.basic_get("q", no_ack=False) for _ in range(2)]
    assert [m.delivery_tag for m in got] == [t for _, t in sent] and r.llen("q") == 0
    ch.qos.restore_unacked()  # what kombu runs when the channel closes with messages held
    assert hook.given_back == [sorted(t for _, t in sent)]
    back = {json.loads(x)["headers"]["id"] for x in r.lrange("q", 0, -1)}
    assert back == {j for j, _ in sent} and r.hlen(ch.unacked_key) == 0


def test_qos_without_a_hook_is_kombus(hooked) -> None:
    r, conn, hook = hooked
    broker.install(None)
    _push(r, 1)
    ch = conn.default_channel
    m = ch.basic_get("q", no_ack=False)
    assert hook.received == [] and r.get("hooked") is None
    assert r.hget(ch.unacked_key, m.delivery_tag) is not None
    m.ack()
    assert r.hlen(ch.unacked_key) == 0


# ---------------------------------------------------------------- the hub's refresh (api/hub.py)
def _register(r: redis.Redis, wid: str, model: str, **fields: Any) -> str:
    private = keys.private_queue(model, wid)
    reg = {"id": wid, "model": model, "device": "cpu", "queues": f"{keys.shared_queue(model)},{private}", "info": "{}", "heartbeat": str(time.time()), "in_flight": "1", "processed": "7"}
    r.hset(keys.worker(wid), mapping={**reg, **{k: str(v) for k, v in fields.items()}})
    r.sadd(keys.WORKERS, wid)
    return private


def test_hub_refresh_reads_depths_workers_and_watches_a_worker_that_left(redis_server) -> None:
    from api.hub import Hub

    url = _url(redis_server, 8)
    r = redis.Redis.from_url(url)
    r.flushdb()
    for i in range(3):
        r.lpush("echo", b"m%d" % i)
    r.lpush("textmask", b"t")
    p1 = _register(r, "w1", "echo")
    p2 = _register(r, "w2", "echo", processed=3)
    r.lpush(p1, b"a", b"b")
    r.sadd(keys.WORKERS, "ghost")  # in the set, its registration expired: dropped from the set
    r.lpush(keys.private_queue("echo", "ghost"), b"stranded")

    async def go() -> None:
        hub = Hub(Settings(redis_url=url, visibility_timeout_s=5))
        ghost = keys.private_queue("echo", "ghost")
        try:
            await hub.refresh()
            assert hub.redis_ok
            assert hub.depth["echo"] == 3 + 2 and hub.depth["textmask"] == 1  # shared + live workers' private queues
            assert hub.private_depth == {p1: 2, p2: 0}
            assert sorted(w.id for w in hub.live("echo")) == ["w1", "w2"] and hub.live("textmask") == []
            w2 = next(w for w in hub.live("echo") if w.id == "w2")
            assert w2.queues == ["echo", p2] and w2.processed == 3 and w2.in_flight == 1
            assert r.smembers(keys.WORKERS) == {b"w1", b"w2"}
            # the ghost's model is unknown: its private queue under every model is watched from now on
            assert ghost in hub.orphans and keys.private_queue("textmask", "ghost") in hub.orphans and not hub._handing

            # an admission estimate is replaced by the real length at the next refresh
            hub.admit("echo", 4, queue=p2)
            assert hub.depth["echo"] == 5 + 4 and hub.private_depth[p2] == 4
            r.delete(keys.worker("w1"))  # w1 leaves (its registration expires) with two messages on its queue
            await hub.refresh()
            assert [w.id for w in hub.live("echo")] == ["w2"] and hub.private_depth == {p2: 0}
            assert hub.depth["echo"] == 3  # w1's backlog is nobody's now: not counted
            assert hub.orphans[p1][:2] == ("echo", "w1")
            # what waited on the ghost's queue (read in this refresh) is handed to the shared queue
            await asyncio.gather(*hub._handing.values())
            assert r.llen(ghost) == 0 and r.llen("echo") == 4
            await hub.refresh()  # this one reads w1's queue: two waiting, handed over
            await asyncio.gather(*hub._handing.values())
            assert r.llen(p1) == 0 and r.llen("echo") == 6
            await hub.refresh()
            assert hub.depth["echo"] == 6
        finally:
            await hub.stop()

    asyncio.run(go())
    r.flushdb()


def test_hub_refresh_failure_leaves_the_api_refusing(redis_server) -> None:
    """Redis gone: refresh raises, the poller marks Redis unreachable, and admission answers 503."""
    from api.hub import Hub
    from tasks.errors import BrokerUnavailable

    async def go() -> None:
        hub = Hub(Settings(redis_url="redis://127.0.0.1:1/0"))
        hub.redis_ok = True
        try:
            with pytest.raises((redis.exceptions.ConnectionError, OSError)):
                await hub.refresh()
            task = asyncio.create_task(hub._poll())
            for _ in range(100):
                if not hub.redis_ok:
                    break
                await asyncio.sleep(0.02)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            with pytest.raises(BrokerUnavailable):
                hub.check("echo")
        finally:
            await hub.stop()

    asyncio.run(go())
