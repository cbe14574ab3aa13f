"""A multi-clip job's bookkeeping beside its record (V-JEPA 2 `video` and `frames` jobs): keys, scripts, creation.

A job of many clips is a parent job record `tf:job:<id>` and one child request per clip
(`<id>.<index>`, not listed among the tenant's jobs). Its bookkeeping lives beside the record:

    tf:clips:<id>:state   hash  total (-1 until the video is decoded to its end), emitted,
                                frames, fps, ... and per decode-chunk delivery counters
    tf:clips:<id>:done    hash  clip index → the clip's result JSON

The scripts below keep the parent's `progress` field in step with them; whoever records
the last clip (a worker, or the decode task that learns the total) assembles the result.
"""

from __future__ import annotations

from typing import Any

import orjson

from tasks import keys
from tasks.jobstore import lua
from tasks.jobstore.record import create
from tasks.queuekeys import QueueKeys


def state_key(job_id: str) -> str:
    return f"{keys.PREFIX}:clips:{job_id}:state"


def done_key(job_id: str) -> str:
    return f"{keys.PREFIX}:clips:{job_id}:done"


def child_id(job_id: str, index: int) -> str:
    return f"{job_id}.{index}"


_PROGRESS = (
    """
local function progress(job, state, done)
  local n = redis.call('HLEN', done)
  local total = tonumber(redis.call('HGET', state, 'total') or '-1')
  local est = tonumber(redis.call('HGET', state, 'estimated') or '-1')
  local p = {done = n, clips_done = n,
             clips_emitted = tonumber(redis.call('HGET', state, 'emitted') or '0'),
             frames_decoded = tonumber(redis.call('HGET', state, 'frames') or '0')}
  if total >= 0 then
    p.total = total
    p.clips_total = total
  elseif est >= 0 then
    p.total = math.max(est, n)
    p.estimated = true
  end
  redis.call('HSET', job, 'progress', cjson.encode(p))
  return {n, total}
end
"""
    + lua.TERMINAL_FN
)

# KEYS[1]=job KEYS[2]=state KEYS[3]=done  ARGV[1]=index ARGV[2]=result json ARGV[3]=now ARGV[4]=ttl
# → {clips done, total (-1 unknown)}; {-1, -1} when the parent is gone or already finished
RECORD_LUA = (
    _PROGRESS
    + """
local st = job_status(KEYS[1])
if not st then return {-1, -1} end
if terminal(st) then return {-1, -1} end
if st == 'queued' then redis.call('HSET', KEYS[1], 'status', '"running"', 'started_at', ARGV[3]) end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[4]))
return progress(KEYS[1], KEYS[2], KEYS[3])
"""
)

# KEYS[1]=job KEYS[2]=state KEYS[3]=done  ARGV[1]=clips emitted so far ARGV[2]=frames decoded so far
# ARGV[3]=total clips when the video ended in this chunk, else -1 ARGV[4]=estimated total or -1
# → {clips done, total, status}
EMITTED_LUA = (
    _PROGRESS
    + """
local st = job_status(KEYS[1])
if not st then return {-1, -1, 'missing'} end
if terminal(st) then return {-1, -1, st} end
redis.call('HSET', KEYS[2], 'emitted', ARGV[1], 'frames', ARGV[2])
if tonumber(ARGV[3]) >= 0 then redis.call('HSET', KEYS[2], 'total', ARGV[3]) end
if tonumber(ARGV[4]) >= 0 then redis.call('HSET', KEYS[2], 'estimated', ARGV[4]) end
local r = progress(KEYS[1], KEYS[2], KEYS[3])
return {r[1], r[2], st}
"""
)

# KEYS[1]=job KEYS[2]=state  ARGV[1]=now ARGV[2]=max deliveries ARGV[3]=chunk number
# → {status, deliveries}; status 'dead' when this chunk was delivered too often (the caller then
# fails the job through the job store's `fail`, which also queues its webhook)
CHUNK_START_LUA = (
    _PROGRESS
    + """
local st = job_status(KEYS[1])
if not st then return {'missing', 0} end
if terminal(st) then return {st, 0} end
local n = redis.call('HINCRBY', KEYS[2], 'deliveries:' .. ARGV[3], 1)
if n > tonumber(ARGV[2]) then return {'dead', n} end
if st == 'queued' then redis.call('HSET', KEYS[1], 'status', '"running"', 'started_at', ARGV[1]) end
return {'running', n}
"""
)


def queue_parent(pipe: Any, doc: dict[str, Any], state: dict[str, Any], ttl: int) -> None:
    """Add the parent job record (listed among the tenant's jobs) and its state to a pipeline."""
    create(pipe, doc, ttl=ttl)
    pipe.hset(state_key(doc["id"]), mapping={k2: orjson.dumps(v) if isinstance(v, (dict, list)) else str(v) for k2, v in state.items()})
    pipe.expire(state_key(doc["id"]), ttl)


def queue_children(pipe: Any, reqs: list[Any], ttl: int, qkeys: QueueKeys) -> None:
    """Add each clip's own record and its `trifecta.infer` message to a pipeline (sync or asyncio);
    `qkeys` names the queue's Redis key (`tasks.queuekeys.for_settings`)."""
    from tasks.wire import build_message

    for q in reqs:
        create(pipe, {"id": q.id, "model": q.model, "kind": "clip", "tenant": q.tenant, "created_at": q.created, "params": q.params}, ttl=ttl, lifetime="part")
        queue = keys.shared_queue(q.model)
        pipe.lpush(qkeys.queue(queue), build_message(keys.TASK_INFER, q.id, {"req": q.model_dump(exclude_none=True)}, queue))
