"""A shard job's bookkeeping beside its record: the SHARD script (start, progress, done per shard) and finishing the job.

    tf:shards:<id>           hash  n (shards), a:<i> deliveries and r:<i> result of shard i, totals, t0
    tf:shards-running:<id>   hash  shard index → live progress of the shards being processed now

The job's `progress` field is recomputed from both on every call; the worker that records the
last shard finishes the job (`finish`).
"""

from __future__ import annotations

from typing import Any

import orjson

from tasks import keys
from tasks.jobstore import lua
from tasks.jobstore.faces import Jobs
from tasks.jobstore.record import error

# KEYS[1]=job KEYS[2]=shards KEYS[3]=running
# ARGV[1]=op (start|progress|done) ARGV[2]=shard index ARGV[3]=json ARGV[4]=now ARGV[5]=max deliveries ARGV[6]=ttl
# returns {state, n}: state run|done|complete|dead|<job status>|missing
SHARD_LUA = (
    lua.TERMINAL_FN
    + """
local function round2(x) return math.floor(x * 100 + 0.5) / 100 end
local function progress(now)
  local f = redis.call('HMGET', KEYS[2], 'n', 'shards_done', 'samples', 'done', 'failed', 't0')
  local n, sd, ss = tonumber(f[1] or '0'), tonumber(f[2] or '0'), tonumber(f[3] or '0')
  local d, fl = tonumber(f[4] or '0'), tonumber(f[5] or '0')
  local t0 = tonumber(f[6] or now)
  local run = redis.call('HVALS', KEYS[3])
  local rdone, rfail, rest = 0, 0, 0
  for _, v in ipairs(run) do
    local p = cjson.decode(v)
    rdone = rdone + p.done
    rfail = rfail + p.failed
    local e = p.seen
    if p.size and p.size > 0 and p.read > 0 and p.read < p.size then e = math.max(p.seen, p.seen * p.size / p.read) end
    rest = rest + e
  end
  local known = sd + #run
  local total = ss + rest
  if n > known and known > 0 then total = total + (n - known) * total / known end
  local processed = d + fl + rdone + rfail
  if total < processed then total = processed end
  local out = {shards_total = n, shards_done = sd, shards_running = #run, samples_total = math.floor(total + 0.5),
    samples_done = d + rdone, samples_failed = fl + rfail, samples_total_exact = (sd >= n), throughput = 0, eta_s = cjson.null}
  local elapsed = now - t0
  if processed > 0 and elapsed > 0 then
    out.throughput = round2(processed / elapsed)
    out.eta_s = round2((out.samples_total - processed) / (processed / elapsed))
  end
  redis.call('HSET', KEYS[1], 'progress', cjson.encode(out))
end
local st = job_status(KEYS[1])
if not st then return {'missing', 0} end
local op, i, now = ARGV[1], ARGV[2], tonumber(ARGV[4])
local n = tonumber(redis.call('HGET', KEYS[2], 'n') or '0')
if op == 'start' then
  if terminal(st) then return {st, 0} end
  if redis.call('HEXISTS', KEYS[2], 'r:' .. i) == 1 then
    if tonumber(redis.call('HGET', KEYS[2], 'shards_done') or '0') >= n then return {'complete', 0} end
    return {'done', 0}
  end
  local a = redis.call('HINCRBY', KEYS[2], 'a:' .. i, 1)
  if a > tonumber(ARGV[5]) then return {'dead', a} end
  redis.call('HSETNX', KEYS[2], 't0', ARGV[4])
  if st == 'queued' then redis.call('HSET', KEYS[1], 'status', '"running"', 'started_at', ARGV[4]) end
  redis.call('HSET', KEYS[3], i, ARGV[3])
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[6]))
  progress(now)
  return {'run', a}
elseif op == 'progress' then
  if terminal(st) then return {st, 0} end
  if redis.call('HEXISTS', KEYS[2], 'r:' .. i) == 1 then return {'done', 0} end
  redis.call('HSET', KEYS[3], i, ARGV[3])
  progress(now)
  return {st, 0}
end
-- done: the shard's result is recorded once, its counts added once
local res = cjson.decode(ARGV[3])
if redis.call('HSETNX', KEYS[2], 'r:' .. i, ARGV[3]) == 1 then
  redis.call('HINCRBY', KEYS[2], 'shards_done', 1)
  redis.call('HINCRBY', KEYS[2], 'samples', res.samples)
  redis.call('HINCRBY', KEYS[2], 'done', res.done)
  redis.call('HINCRBY', KEYS[2], 'failed', res.failed)
end
redis.call('HDEL', KEYS[3], i)
if terminal(st) then return {st, 0} end
progress(now)
if tonumber(redis.call('HGET', KEYS[2], 'shards_done') or '0') >= n then return {'complete', 0} end
return {st, 0}
"""
)


def create(pipe: Any, doc: dict[str, Any], n_shards: int, ttl: int) -> None:
    """Queue a shard job's record and its shard count on a pipeline."""
    from tasks.jobstore.record import create as create_record

    create_record(pipe, doc, ttl=ttl)
    pipe.hset(keys.shards(doc["id"]), "n", n_shards)
    pipe.expire(keys.shards(doc["id"]), ttl)


def results(r: Any, job_id: str) -> list[dict[str, Any]]:
    """Every recorded shard's result, by shard index."""
    raw = r.hgetall(keys.shards(job_id))
    return sorted((orjson.loads(v) for k, v in raw.items() if k.startswith(b"r:")), key=lambda x: x["index"])


def finish(r: Any, job_id: str, result: dict[str, Any], done: int, failed: int, manifest_written: bool) -> tuple[str, bool]:
    """Finish a shard job once, whoever calls: `succeeded`, or `failed` (keeping its result: the
    manifest says why each sample failed) when the manifest is missing or no sample succeeded.
    Returns (status, whether this call landed it)."""
    err: dict[str, Any] | None = None
    if not manifest_written:
        err = error("storage_error", "the job manifest could not be written (storage failed after retries); the shard outputs and their manifests stand")
    elif done == 0:
        msg = f"every sample failed ({failed}); see the manifest" if failed else "the shards held no readable samples; see the manifest"
        err = error("all_samples_failed" if failed else "no_samples", msg, status=422)
    if err is None:
        return "succeeded", bool(Jobs(r).finish(job_id, "succeeded", "result", result))
    r.hset(keys.job(job_id), "result", orjson.dumps(result))
    return "failed", bool(Jobs(r).finish(job_id, "failed", "error", err))
