"""Handing over the private queue of a worker that left, so nothing waits on it forever.

A worker's private queue `<model>.<worker-id>` (`tasks.keys.private_queue`) is consumed by
that worker alone: SAM3 image requests routed there for its feature cache, and the calls of
the video sessions it holds. When the worker leaves, what waits there is handed over:

- a request that needs no state of that worker (`trifecta.infer`, anything else) moves to
  the front of the model's shared queue, where any live worker takes it; its routing key is
  rewritten to the shared queue, so that a later redelivery (kombu's restore after the
  visibility timeout) also goes there and not back to the dead queue;
- a video-session call (`trifecta.video`) needs the frames and tracking state that left
  with the worker: it is answered at once, 410 `gone` (a `start` that never ran: 503
  `no_worker`, retry), and an async propagate job it carried is failed with the same error.

    moved, answered = hand_over(r, "sam3", "w1")   # blocking redis client

Two callers: the worker itself, last thing before it exits on SIGTERM (workers.membership),
and the API, for a worker whose registration vanished (killed, lost host) and for messages
that reached a queue after its worker's own hand-over (api.hub). Each message moves by a
compare-and-pop script, so any number of callers may hand over the same queue at once and
a caller that dies midway loses nothing: a message leaves the private queue only in the
same script that puts it on the shared one.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from tasks import jobstore, keys
from tasks.errors import Gone, NoWorker
from tasks.queuekeys import QueueKeys
from tasks.sam3_video import TASK_VIDEO

log = logging.getLogger("trifecta.handoff")

# KEYS[1]=private queue KEYS[2]=shared queue  ARGV[1]=the message expected at the newest end ARGV[2]=what to push ('' = none)
# The newest message goes first and is pushed at the consuming end, so when the queue is
# empty the moved messages sit in front of the shared queue in their original order.
MOVE_LUA = """
if redis.call('LINDEX', KEYS[1], 0) ~= ARGV[1] then return 0 end
redis.call('LPOP', KEYS[1])
if ARGV[2] ~= '' then redis.call('RPUSH', KEYS[2], ARGV[2]) end
return 1
"""


def owner_of(queue: str, model: str) -> str:
    """The worker id in a private queue's name."""
    return queue[len(model) + 1 :]


def plan(raw: bytes, model: str, worker_id: str) -> tuple[bytes, dict[str, Any] | None]:
    """What becomes of one message: (the message to push on the shared queue, or b"" when it is
    answered instead; the answer: {"reply", "body", "job"} or None)."""
    try:
        msg = orjson.loads(raw)
        task = msg["headers"]["task"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return raw, None  # not ours to judge: a worker reads it (and drops it loudly if it must)
    if task != TASK_VIDEO:
        try:
            msg["properties"]["delivery_info"]["routing_key"] = keys.shared_queue(model)
        except (KeyError, TypeError):
            return raw, None
        return orjson.dumps(msg), None
    from tasks.wire import decode_message

    try:
        _, kw = decode_message(raw)
        call = kw["call"]
    except Exception:  # noqa: BLE001 - an unreadable call has no one to answer
        return b"", None
    sid, op = call.get("session_id", ""), call.get("op")
    if op == "start":
        err = NoWorker(f"worker {worker_id} stopped before it could start session {sid}; start it again (another worker takes it)")
    else:
        err = Gone(f"session {sid} lived on worker {worker_id}, which stopped before this {op!r} call ran; its frames and tracking state are gone — start a new session")
    body = {"id": call.get("id", ""), "status": "failed", "error": jobstore.error(err)}
    job = (call.get("args") or {}).get("job")
    return b"", {"reply": call.get("reply") or "", "body": body, "job": str(job) if job else ""}


def hand_over(r: Any, model: str, worker_id: str, qkeys: QueueKeys | None = None, limit: int = 100_000) -> tuple[int, int]:
    """Empty the private queue of `worker_id` (a blocking redis.Redis): (moved, answered).

    `qkeys`: the deployment's queue keys (`tasks.queuekeys.for_settings`), kombu's defaults when None."""
    qk = qkeys or QueueKeys()
    queue, shared = keys.private_queue(model, worker_id), keys.shared_queue(model)
    queue_key, shared_key = qk.queue(queue), qk.queue(shared)
    move = r.register_script(MOVE_LUA)
    moved = answered = 0
    for _ in range(limit):
        raw = r.lindex(queue_key, 0)
        if raw is None:
            break
        push, answer = plan(raw, model, worker_id)
        if not move(keys=[queue_key, shared_key], args=[raw, push]):
            continue  # someone else took it (or a new message arrived): look again
        if answer is None:
            moved += bool(push)
            continue
        answered += 1
        pipe = r.pipeline(transaction=False)
        body = orjson.dumps(answer["body"])
        if answer["job"]:
            jobstore.queue(pipe, jobstore.fail_call(answer["job"], answer["body"]["error"]))
        if answer["reply"]:
            pipe.publish(answer["reply"], body)
        pipe.execute()
    if moved or answered:
        log.info("private queue %s handed over: %d moved to %s, %d session calls answered (their worker left)", queue, moved, shared, answered, extra={"worker": worker_id})
    return moved, answered
