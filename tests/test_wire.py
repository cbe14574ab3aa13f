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
        popped = r.eval(DRAIN_LUA, 3, "qb", unacked, index, 1, t0, TASK)
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
    the channel (never spelled out), so they follow."""
    url = _url(redis_server, 12)
    with Connection(url, transport_options={"global_keyprefix": "tf-test:"}) as conn:
        ch = conn.default_channel
        assert ch.unacked_key == "unacked" and ch.unacked_index_key == "unacked_index"
        assert ch.global_keyprefix == "tf-test:"
