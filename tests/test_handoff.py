"""Handing over a departed worker's private queue (tasks/handoff.py), against a real Redis:
requests move to the shared queue once each and in order, however many callers hand over at
once; video-session calls are answered 410 (a `start`: 503) and their async job is failed."""

from __future__ import annotations

import threading
import time

import orjson
import redis

from tasks import handoff, jobstore, keys
from tasks.embedded_redis import EmbeddedRedis
from tasks.sam3_video import TASK_VIDEO
from tasks.schemas import InferRequest
from tasks.wire import build_message, decode_message


def infer_message(jid: str, queue: str) -> bytes:
    now = time.time()
    q = InferRequest.model_validate({"id": jid, "model": "sam3", "input": {"b64": "", "size": 0}, "deadline": now + 60, "kind": "job", "out_prefix": f"default/jobs/{jid}", "created": now})
    return build_message(keys.TASK_INFER, jid, {"req": q.model_dump(exclude_none=True)}, queue)


def video_call(cid: str, op: str, queue: str, reply: str, job: str | None = None) -> bytes:
    call = {"id": cid, "op": op, "session_id": "s-1", "tenant": "default", "args": {"job": job} if job else {}, "reply": reply}
    return build_message(TASK_VIDEO, cid, {"call": call}, queue)


def test_plan_rewrites_only_the_routing_key() -> None:
    raw = infer_message("j1", "sam3.w1")
    push, answer = handoff.plan(raw, "sam3", "w1")
    assert answer is None
    before, after = orjson.loads(raw), orjson.loads(push)
    assert after["properties"]["delivery_info"]["routing_key"] == "sam3"
    after["properties"]["delivery_info"]["routing_key"] = "sam3.w1"
    assert after == before  # body, headers, delivery tag unchanged
    assert handoff.plan(b"not json", "sam3", "w1") == (b"not json", None)  # left for a worker to judge
    push, answer = handoff.plan(video_call("c1", "prompt", "sam3.w1", "tf:reply:api1"), "sam3", "w1")
    assert push == b"" and answer is not None
    assert answer["reply"] == "tf:reply:api1" and answer["job"] == ""
    err = answer["body"]["error"]
    assert answer["body"]["id"] == "c1" and answer["body"]["status"] == "failed"
    assert err["code"] == "gone" and err["status"] == 410 and "session s-1 lived on worker w1" in err["message"] and "'prompt'" in err["message"]
    _, answer = handoff.plan(video_call("c2", "start", "sam3.w1", "tf:reply:api1"), "sam3", "w1")
    assert answer is not None and answer["body"]["error"]["code"] == "no_worker" and answer["body"]["error"]["status"] == 503


def test_hand_over_moves_each_message_once_in_order_and_answers_session_calls(tmp_path) -> None:  # noqa: ANN001
    srv = EmbeddedRedis(tmp_path, appendonly=False).start()
    try:
        r = redis.Redis(port=srv.port)
        private = keys.private_queue("sam3", "w1")
        r.rpush("sam3", infer_message("already-shared", "sam3"))
        n = 200
        for i in range(n):  # oldest first at the consuming (right) end, as the API's LPUSH leaves them
            r.lpush(private, infer_message(f"j{i:03d}", private))
        job = "video-job"
        r.hset(keys.job(job), mapping=jobstore.new_record({"id": job, "model": "sam3", "kind": "video-propagate"}))
        sub = r.pubsub()
        sub.subscribe("tf:reply:api1")
        sub.get_message(timeout=1)
        r.lpush(private, video_call("c-status", "status", private, "tf:reply:api1"), video_call("c-prop", "propagate", private, "", job=job))
        totals: list[tuple[int, int]] = []
        threads = [threading.Thread(target=lambda: totals.append(handoff.hand_over(redis.Redis(port=srv.port), "sam3", "w1"))) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sum(m for m, _ in totals) == n and sum(a for _, a in totals) == 2  # three callers, each message handled once
        assert r.llen(private) == 0
        shared = [decode_message(m) for m in reversed(r.lrange("sam3", 0, -1))]  # consuming order
        assert [h["id"] for h, _ in shared] == [f"j{i:03d}" for i in range(n)] + ["already-shared"]  # moved ones first, in their order
        assert all(orjson.loads(m)["properties"]["delivery_info"]["routing_key"] == "sam3" for m in r.lrange("sam3", 0, -1))
        msg = sub.get_message(timeout=5)
        assert msg is not None
        body = orjson.loads(msg["data"])
        assert body["id"] == "c-status" and body["status"] == "failed" and body["error"]["code"] == "gone" and body["error"]["status"] == 410
        rec = jobstore.parse_record(r.hgetall(keys.job(job)))
        assert rec["status"] == "failed" and rec["error"]["code"] == "gone" and "w1" in rec["error"]["message"]
        assert handoff.hand_over(r, "sam3", "w1") == (0, 0)  # nothing left: a no-op
    finally:
        srv.stop()


def test_hand_over_under_global_keyprefix(tmp_path) -> None:  # noqa: ANN001
    """With kombu's `global_keyprefix` set the queues live under it in Redis: the hand-over reads
    the prefixed private list and fills the prefixed shared one, where kombu's own consumer finds
    the messages; the routing key stays the queue's plain name (kombu adds the prefix itself)."""
    from kombu import Connection

    from tasks.queuekeys import QueueKeys

    srv = EmbeddedRedis(tmp_path, appendonly=False).start()
    try:
        r = redis.Redis(port=srv.port)
        qk = QueueKeys.from_options({"global_keyprefix": "acme:"})
        private = keys.private_queue("sam3", "w1")
        for i in range(3):
            r.lpush(qk.queue(private), infer_message(f"p{i}", private))
        r.lpush(private, infer_message("unprefixed-twin", private))  # another app's list of the same name: not ours
        assert handoff.hand_over(r, "sam3", "w1", qk) == (3, 0)
        assert r.llen(qk.queue(private)) == 0 and r.llen(private) == 1 and not r.exists("sam3")
        assert r.llen("acme:sam3") == 3
        with Connection(f"redis://127.0.0.1:{srv.port}/0", transport_options={"global_keyprefix": "acme:"}) as conn:
            got = [conn.default_channel.basic_get("sam3", no_ack=True) for _ in range(3)]
        assert [m.headers["id"] for m in got] == ["p0", "p1", "p2"]
        assert all(m.delivery_info["routing_key"] == "sam3" for m in got)
    finally:
        srv.stop()
