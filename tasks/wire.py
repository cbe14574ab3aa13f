"""Celery task messages as they travel through Redis, built without a kombu Producer.

Why by hand: the API is asyncio and kombu's Redis producer is blocking; building the
envelope ourselves lets the API publish with `redis.asyncio` in the same pipeline that
writes the job record (one round trip per request). The envelope is exactly what
`kombu.transport.redis.Channel._put` writes for Celery's message protocol 2 on the
default exchange (`tests/test_wire.py` checks it field by field against Celery's own
`send_task` and runs it through a real worker). With tracing on (tasks/tracing.py) the
headers also carry the W3C trace context (`traceparent`), as an extra header Celery passes on.
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

import orjson

from tasks import tracing

_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def build_message(task_name: str, task_id: str, kwargs: dict[str, Any], queue: str, origin: str = "trifecta-api") -> bytes:
    """The JSON string LPUSHed onto the Redis list named `queue`."""
    body = orjson.dumps([[], kwargs, _EMBED])
    headers = {
        "lang": "py",
        "task": task_name,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "()",
        "kwargsrepr": "{...}",
        "origin": origin,
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    if tracing.ON:  # the sender's trace context (`traceparent` ...): the worker's spans continue it
        tracing.inject(headers)
    message = {
        "body": base64.b64encode(body).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return orjson.dumps(message)


def decode_message(raw: bytes | str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(headers, kwargs) of a message read back from a queue list (tests, dead-lettering)."""
    msg = orjson.loads(raw)
    args, kwargs, _ = orjson.loads(base64.b64decode(msg["body"]))
    return msg["headers"], kwargs


# Top up a batch straight from a queue, with kombu's own at-least-once bookkeeping.
# KEYS[1]=queue KEYS[2]=unacked hash KEYS[3]=unacked_index zset  ARGV[1]=max n ARGV[2]=now ARGV[3]=task name
# ARGV[4]=routing key (the queue's name as kombu knows it: KEYS are the names in Redis, which
# carry kombu's `global_keyprefix` when one is set; kombu adds it again when it restores).
# Key names come from the worker's kombu channel (workers.broker.KombuKeys), never spelled here.
# Pops from the same end kombu's BRPOP does, stops at the first message of another task,
# and records each popped message in `unacked` exactly as kombu's QoS.append does
# ([message, exchange, routing_key] keyed by delivery tag, scored by time), so a worker
# that dies holding them has them restored by kombu after the visibility timeout.
DRAIN_LUA = """
local out = {}
for i = 1, tonumber(ARGV[1]) do
  local m = redis.call('LINDEX', KEYS[1], -1)
  if not m then break end
  local ok, msg = pcall(cjson.decode, m)
  if not ok or msg['headers'] == nil or msg['headers']['task'] ~= ARGV[3] then break end
  redis.call('RPOP', KEYS[1])
  local tag = msg['properties']['delivery_tag']
  redis.call('HSET', KEYS[2], tag, '[' .. m .. ',"",' .. cjson.encode(ARGV[4]) .. ']')
  redis.call('ZADD', KEYS[3], ARGV[2], tag)
  out[#out + 1] = m
end
return out
"""


def delivery_tag(raw: bytes | str) -> str:
    return orjson.loads(raw)["properties"]["delivery_tag"]
