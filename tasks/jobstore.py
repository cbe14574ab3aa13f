"""The job record in Redis and its state transitions, shared by the API and the workers.

A job is a hash `tf:job:<id>` whose fields are JSON values:

    doc        what was submitted: id, model, kind, tenant, created_at, params, input summary
    status     queued | running | succeeded | failed | cancelled | expired
    attempts   deliveries so far (a message redelivered after a worker death counts again)
    started_at, finished_at   unix seconds
    progress   {"done", "total", ...} for multi-part jobs
    result     {"outputs": [...], "meta": {...}, "timing": {...}, "worker": ...}
    error      {"code", "message"}

Transitions are Lua scripts so a cancel racing a worker never ends in a mixed state:
`start` refuses a terminal job and counts the delivery; `finish` only lands on a
running or queued job.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from tasks import keys

# A job that reaches a terminal state with a `callback_url` in its doc is queued for the
# API's webhook sender in the same script (no extra round trip). The queue key is written
# into the script rather than passed in KEYS so every caller of these scripts (runners with
# their own finishing paths too) queues webhooks without changing its call.
_NOTIFY_LUA = """
local _doc = redis.call('HGET', KEYS[1], 'doc')
if _doc and string.find(_doc, 'callback_url', 1, true) then
  local _d = cjson.decode(_doc)
  if type(_d.callback_url) == 'string' and _d.callback_url ~= '' then
    redis.call('LPUSH', '%s', string.sub(KEYS[1], %d))
  end
end
""".replace("%s", keys.WEBHOOK_QUEUE, 1).replace("%d", str(len(keys.job("")) + 1), 1)

# KEYS[1]=job  ARGV[1]=now ARGV[2]=max_deliveries ARGV[3]=worker id (recorded while it runs)
# returns {status, attempts}; status "dead" when over max deliveries (job marked failed)
START_LUA = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'missing', 0} end
st = cjson.decode(st)
if st == 'succeeded' or st == 'failed' or st == 'cancelled' or st == 'expired' then
  return {st, tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')}
end
local n = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if n > tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'status', '"failed"', 'finished_at', ARGV[1],
    'error', cjson.encode({code='dead_lettered', message='delivered ' .. (n - 1) ..
      ' times without finishing (the worker died each time); not retried'}))
""" + _NOTIFY_LUA + """
  return {'dead', n}
end
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'status', '"running"', 'started_at', ARGV[1])
end
if ARGV[3] then redis.call('HSET', KEYS[1], 'worker', ARGV[3]) end
return {'running', n}
"""

# KEYS[1]=job  ARGV[1]=status ARGV[2]=now ARGV[3]=field(result|error) ARGV[4]=json
# ARGV[5]=reply channel or '' ARGV[6]=reply message
# ARGV[7]=SYNC_RESULT_TTL_S for a sync request ('' or absent: the record keeps its TTL)
# ARGV[8]='1' when the result's outputs travel in the reply only (STORE_SYNC_RESULTS=false)
# returns 1 landed, 0 refused (already terminal, or no record), -1 not landed because the API
# gave up waiting (detached, a 504) and the outputs must be stored first: store them, finish again.
#
# A sync request answered in time keeps its record SYNC_RESULT_TTL_S and gets no tombstone;
# one the API detached (DETACH_LUA, on its 504) keeps the job lifetime set at submit. Both
# sides decide inside one script on the same record, so either order of the race lands right.
# The shebang makes Redis refuse the whole script up front at maxmemory (noeviction) instead of
# failing at its first write, so a worker's MULTI (results + acks) aborts as a whole: a result
# Redis could not record is never acked (workers/service.py retries it).
FINISH_LUA = """#!lua
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 0 end
st = cjson.decode(st)
if st == 'succeeded' or st == 'failed' or st == 'cancelled' or st == 'expired' then return 0 end
local detached = redis.call('HEXISTS', KEYS[1], 'detached') == 1
if detached and ARGV[8] == '1' then return -1 end
redis.call('HSET', KEYS[1], 'status', cjson.encode(ARGV[1]), 'finished_at', ARGV[2], ARGV[3], ARGV[4])
if ARGV[7] and ARGV[7] ~= '' and not detached then redis.call('EXPIRE', KEYS[1], ARGV[7]) end
if ARGV[5] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[6]) end
""" + _NOTIFY_LUA + """
return 1
"""

# The API gave up waiting on a sync request (504): from now on it is a job like any other.
# KEYS[1]=job KEYS[2]=tombstone  ARGV[1]=RESULT_TTL_SECONDS ARGV[2]=tombstone TTL ARGV[3]=tenant
# ARGV[4]='1' to detach a finished one too (the other samples of a tar call that timed out)
# returns the status: a finished record is left as it is unless forced (the API answers it
# instead of 504), 'detached' when it now has the job lifetime and a tombstone, 'missing'.
DETACH_LUA = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
st = cjson.decode(st)
local done = st == 'succeeded' or st == 'failed' or st == 'cancelled' or st == 'expired'
if done and ARGV[4] ~= '1' then return st end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], 'detached', '1')
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[2])
return 'detached'
"""

# KEYS[1]=job ARGV[1]=worker id
# A worker leaving (SIGTERM) gives back a message it received but never ran: the START made at
# receive is undone (the delivery is not counted against MAX_DELIVERIES, the job reads queued
# again), unless another worker has started it meanwhile.
UNSTART_LUA = """
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return 0 end
local st = redis.call('HGET', KEYS[1], 'status')
if not st or cjson.decode(st) ~= 'running' then return 0 end
local n = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if n > 0 then redis.call('HSET', KEYS[1], 'attempts', n - 1) end
redis.call('HSET', KEYS[1], 'status', '"queued"')
redis.call('HDEL', KEYS[1], 'started_at', 'worker')
return 1
"""

# KEYS[1]=job ARGV[1]=now
CANCEL_LUA = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
st = cjson.decode(st)
if st == 'succeeded' or st == 'failed' or st == 'cancelled' or st == 'expired' then return st end
redis.call('HSET', KEYS[1], 'status', '"cancelled"', 'finished_at', ARGV[1])
""" + _NOTIFY_LUA + """
return 'cancelled'
"""


def keep(pipe: Any, job_id: str, tenant: str, ttl: int, now: float) -> None:
    """A job's lifetime on a submit pipeline (its record already HSET): the record's TTL, the
    tombstone that makes an expired id answer `expired`, the expiry index entry of its storage
    prefix (the janitor's work list), and the tenant's job list trimmed of ids past their tombstone."""
    pipe.expire(keys.job(job_id), ttl)
    pipe.set(keys.tomb(job_id), tenant, ex=ttl + keys.TOMBSTONE_S)
    pipe.zadd(keys.EXPIRY, {keys.job_prefix(tenant, job_id): now + ttl})
    pipe.zadd(keys.jobs_index(tenant), {job_id: now})
    pipe.zremrangebyscore(keys.jobs_index(tenant), "-inf", now - ttl - keys.TOMBSTONE_S)


def new_record(doc: dict[str, Any]) -> dict[str, bytes]:
    """Fields of a freshly queued job."""
    return {
        "doc": orjson.dumps(doc),
        "status": b'"queued"',
        "attempts": b"0",
        "progress": orjson.dumps(doc.get("progress") or {}),
    }


def parse_record(raw: dict[bytes | str, bytes | str]) -> dict[str, Any]:
    """A job hash as read from Redis → the job's status document (without links)."""
    f = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
    doc = orjson.loads(f["doc"])
    out: dict[str, Any] = {
        "job_id": doc["id"],
        "model": doc["model"],
        "kind": doc.get("kind", "job"),
        "status": orjson.loads(f.get("status", b'"queued"')),
        "created_at": doc.get("created_at"),
        "started_at": _num(f.get("started_at")),
        "finished_at": _num(f.get("finished_at")),
        "attempts": int(f.get("attempts", 0) or 0),
        "progress": orjson.loads(f["progress"]) if f.get("progress") else {},
        "params": doc.get("params", {}),
        "input": doc.get("input", {}),
        "error": orjson.loads(f["error"]) if f.get("error") else None,
        "result": orjson.loads(f["result"]) if f.get("result") else None,
        "tenant": doc.get("tenant", "default"),
        "worker": (f["worker"].decode() if isinstance(f.get("worker"), bytes) else f.get("worker")),
    }
    if doc.get("callback_url"):
        out["callback_url"] = doc["callback_url"]
    return out


def _num(v: bytes | str | None) -> float | None:
    return float(v) if v not in (None, b"", "") else None


def now() -> float:
    return round(time.time(), 6)


def reply_payload(job_id: str, status: str, body: dict[str, Any]) -> bytes:
    return orjson.dumps({"id": job_id, "status": status, **body})


def job_key(job_id: str) -> str:
    return keys.job(job_id)
