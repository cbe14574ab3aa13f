"""The queue boundary against kombu's and Celery's own output, on a real Redis.

`tasks/wire.py` writes Celery's protocol-2 envelope itself (the API publishes with
redis.asyncio in the pipeline that writes the job record) and its DRAIN script records
popped messages in kombu's `unacked` structures. Both are kombu's and Celery's private
formats (pinned exactly in pyproject.toml): these tests compare them, field by field,
with what Celery's `send_task` and kombu's own QoS write.
"""

from __future__ import annotations

import base64
import json
import time
import uuid

import redis
from kombu import Connection

from tasks.celery_app import make_app
from tasks.settings import Settings
from tasks.wire import DRAIN_LUA, build_message, decode_message
from workers.broker import KombuKeys
from workers.device import Device
from workers.runners.echo import EchoRunner
from workers.service import WorkerService

TASK = "trifecta.infer"
# Where our envelope deliberately differs from Celery's, and why it does not matter to a worker
DIFFERS_HEADERS = {
    "origin",  # Celery: "gen<pid>@<host>"; ours names the API
    "argsrepr",  # reprs for logs and Flower only
    "kwargsrepr",  # ours never carries an image's base64 into logs
}


def _url(redis_server, db: int) -> str:
    return f"redis://127.0.0.1:{redis_server.port}/{db}"


def test_envelope_is_celerys_own(redis_server) -> None:
    url = _url(redis_server, 14)
    r = redis.Redis.from_url(url)
    r.flushdb()
    app = make_app(Settings(redis_url=url))
    tid = uuid.uuid4().hex
    kwargs = {"req": {"id": tid, "model": "echo", "input": {"b64": "aGk=", "size": 2}, "deadline": 1.5}}
    app.send_task(TASK, kwargs=kwargs, task_id=tid, queue="echo", ignore_result=True)
    theirs = json.loads(r.rpop("echo"))
    ours = json.loads(build_message(TASK, tid, kwargs, "echo"))

    assert ours.keys() == theirs.keys()
    assert ours["content-type"] == theirs["content-type"] == "application/json"
    assert ours["content-encoding"] == theirs["content-encoding"]
    assert json.loads(base64.b64decode(ours["body"])) == json.loads(base64.b64decode(theirs["body"]))
    assert ours["headers"].keys() == theirs["headers"].keys()
    for k in ours["headers"].keys() - DIFFERS_HEADERS:
        assert ours["headers"][k] == theirs["headers"][k], k
    p_ours, p_theirs = ours["properties"], theirs["properties"]
    assert p_ours.keys() == p_theirs.keys()
    # reply_to: Celery puts its app's id there for RPC results; with ignore_result nobody replies
    for k in p_ours.keys() - {"delivery_tag", "delivery_info", "reply_to"}:
        assert p_ours[k] == p_theirs[k], k
    uuid.UUID(p_ours["delivery_tag"])  # a fresh tag, as kombu makes one
    # Celery names the queue's own direct exchange, we the default one: both route to the list
    # named by routing_key, which is all a restore of the message reads
    assert p_ours["delivery_info"]["routing_key"] == p_theirs["delivery_info"]["routing_key"] == "echo"
    assert p_ours["delivery_info"]["exchange"] == ""
    headers, got = decode_message(build_message(TASK, tid, kwargs, "echo"))
    assert headers["task"] == TASK and got == kwargs


def test_drain_records_unacked_as_kombus_qos_does(redis_server) -> None:
    """A message popped by our DRAIN script leaves the same unacked record (hash entry and index
    score) as one popped by kombu's own consumer, under the key names the channel itself uses."""
    url = _url(redis_server, 13)
    r = redis.Redis.from_url(url)
    r.flushdb()
    msg_a = build_message(TASK, "a" * 32, {"req": {"n": 1}}, "qa")
    msg_b = build_message(TASK, "b" * 32, {"req": {"n": 1}}, "qb")
    r.lpush("qa", msg_a)
    r.lpush("qb", msg_b)
    with Connection(url) as conn:
        ch = conn.default_channel
        unacked, index = ch.unacked_key, ch.unacked_index_key
        m = ch.basic_get("qa", no_ack=False)  # kombu's own pop: QoS.append writes the record
        assert m is not None
        t0 = time.time()
        popped = r.eval(DRAIN_LUA, 3, "qb", unacked, index, 1, t0, TASK, "qb")
        assert popped == [msg_b]
        tag_a, tag_b = json.loads(msg_a)["properties"]["delivery_tag"], json.loads(msg_b)["properties"]["delivery_tag"]
        rec_a, rec_b = json.loads(r.hget(unacked, tag_a)), json.loads(r.hget(unacked, tag_b))
        assert rec_a == [json.loads(msg_a), "", "qa"]  # kombu's own record
        assert rec_b == [json.loads(msg_b), "", "qb"]  # ours, the same shape
        assert r.zscore(index, tag_b) == t0 and r.zscore(index, tag_a) is not None
        # and kombu restores ours as it restores its own: back onto the queue it came from
        ch.qos.restore_by_tag(tag_b, leftmost=True)
        back = [json.loads(x) for x in r.lrange("qb", 0, -1)]
        want = json.loads(msg_b)
        want["properties"]["delivery_info"]["redelivered"] = True  # kombu marks every restored message
        want["headers"]["redelivered"] = True
        assert back == [want] and r.hget(unacked, tag_b) is None
        m.ack()
        assert r.hget(unacked, tag_a) is None


def test_key_names_follow_global_keyprefix(redis_server) -> None:
    """With `global_keyprefix` set, kombu prefixes its unacked keys: our code reads the names from
    the transport options as kombu's channel does (never spelled out), so they follow."""
    url = _url(redis_server, 12)
    for opts in ({}, {"global_keyprefix": "tf-test:"}, {"global_keyprefix": "p:", "unacked_key": "u", "unacked_index_key": "ui"}):
        with Connection(url, transport_options=opts) as conn:
            ch = conn.default_channel
            assert KombuKeys.from_options(opts) == KombuKeys.of(ch)
    with Connection(url, transport_options={"global_keyprefix": "tf-test:"}) as conn:
        ch = conn.default_channel
        assert ch.unacked_key == "unacked" and ch.unacked_index_key == "unacked_index"
        assert ch.global_keyprefix == "tf-test:"
    assert KombuKeys.from_options({"global_keyprefix": "tf-test:"}) == KombuKeys("tf-test:", "tf-test:unacked", "tf-test:unacked_index")
    assert KombuKeys.from_options({}) == KombuKeys("", "unacked", "unacked_index")


def _service(url: str, tmp_path, opts: dict) -> WorkerService:
    """A worker's service (the echo runner; no Celery worker around it) with the key names run_worker gives it."""
    settings = Settings(redis_url=url, storage_url=f"file://{tmp_path}", max_batch_size=4, bulk_drain=True)
    svc = WorkerService(settings, "echo", Device("cpu", 0, None, 1), "w-prefix", EchoRunner("echo", settings, Device("cpu", 0, None, 1)))
    svc.kombu_keys = KombuKeys.from_options({**make_app(settings).conf.broker_transport_options, **opts})
    return svc


def test_drain_ack_and_heartbeat_under_global_keyprefix(redis_server, tmp_path) -> None:
    """The worker's bulk drain, FINISH's acks and the heartbeat, with kombu's `global_keyprefix` set:
    the messages come off kombu's prefixed queue, their unacked records land where kombu's own
    QoS reads them (kombu restores a drained message to the queue it came from), and the acks
    and visibility refresh touch those records, not unprefixed twins."""
    url = _url(redis_server, 11)
    r = redis.Redis.from_url(url)
    r.flushdb()
    prefix = "tf-test:"
    opts = {"global_keyprefix": prefix}
    svc = _service(url, tmp_path, opts)
    now = time.time()
    ids = [uuid.uuid4().hex for _ in range(3)]
    with Connection(url, transport_options=opts) as conn:
        ch = conn.default_channel
        kc = ch.client  # kombu's own prefixing client: it writes the queue the way kombu's producer does
        for jid in ids:
            req = {"id": jid, "model": "echo", "input": {"b64": "aGk=", "size": 2}, "deadline": now + 60, "out_prefix": f"default/jobs/{jid}", "created": now}
            kc.lpush("echo", build_message(TASK, jid, {"req": req}, "echo"))
        assert r.llen(prefix + "echo") == 3 and r.llen("echo") == 0

        reqs: list = []
        tags, states, kombu_tags = svc._top_up_and_start(reqs)
        assert [q.id for q in reqs] == ids and len(states) == 3 and kombu_tags == []
        assert r.llen(prefix + "echo") == 0
        assert r.hlen(prefix + "unacked") == 3 and r.zcard(prefix + "unacked_index") == 3
        assert not r.exists("unacked") and not r.exists("unacked_index")  # no unprefixed twins
        for tag in tags:  # the routing key is the queue's name as kombu knows it (kombu prefixes it again)
            msg, exchange, routing_key = json.loads(r.hget(prefix + "unacked", tag))
            assert (exchange, routing_key) == ("", "echo") and msg["properties"]["delivery_tag"] == tag

        # the heartbeat keeps them visible: it re-scores the prefixed index (ZADD XX: no new entries)
        r.zadd(prefix + "unacked_index", {t: 1.0 for t in tags})
        svc.beat()
        assert all(r.zscore(prefix + "unacked_index", t) >= now for t in tags)
        assert not r.exists("unacked_index")

        # a worker that died holding one: kombu's own restore puts it back on its prefixed queue
        ch.qos.restore_by_tag(tags[0], leftmost=True)
        back = r.lrange(prefix + "echo", 0, -1)
        assert len(back) == 1 and json.loads(back[0])["headers"]["id"] == ids[0]
        assert not r.exists("echo")

        # FINISH's pipeline acks the rest, as kombu's QoS.ack would
        svc._record([], {}, tags[1:])
        assert r.hlen(prefix + "unacked") == 0 and r.zcard(prefix + "unacked_index") == 0
    r.delete(f"tf:worker:{svc.worker_id}")
