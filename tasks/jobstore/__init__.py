"""The job store: every job record's creation, transitions and lifetime, for the API and the workers alike.

A job is a hash `tf:job:<id>` whose fields are JSON values:

    doc        what was submitted: id, model, kind, tenant, created_at, params, input summary
    status     queued | running | succeeded | failed | cancelled | expired
    attempts   deliveries so far (a message redelivered after a worker death counts again)
    started_at, finished_at   unix seconds
    progress   {"done", "total", ...} for multi-part jobs
    result     {"outputs": [...], "meta": {...}, "timing": {...}, "worker": ...}
    error      {"code", "message", "status"}: the one error shape (`error`)

The lifecycle, each step in one place:

    create     `create(pipe, doc, ttl=, lifetime=job|sync|part)` on the caller's submit pipeline
               (no round trip of its own): the record, and for a job its TTL, tombstone, expiry
               index entry and place in the tenant's list (`keep`)
    start      START: refuses a terminal job, counts the delivery, dead-letters past MAX_DELIVERIES
    progress   PROGRESS (or a kind's own script: `shards.SHARD_LUA`, `clips.RECORD_LUA`)
    finish     FINISH: lands only on a running or queued job, once; `fail` is finish with `error`
    cancel     CANCEL; the workers notice at their next progress report or batch
    expire     the record's TTL; its tombstone makes the id answer `expired` (DETACH gives a sync
               request the job lifetime when the API stops waiting); the janitor reads `tf:expiry`
    webhook    every transition to a terminal status queues the job's `callback_url` in the same
               script (`lua.NOTIFY`), for the API's sender

Transitions are Lua scripts (`lua`), generated from the one terminal set `keys.TERMINAL`, so a
cancel racing a worker never ends in a mixed state. `Jobs(redis.Redis)` is the workers' face and
`AsyncJobs(redis.asyncio.Redis)` the API's, with the same methods; the hot paths
(workers/service.py's batch, the API's submit) queue the same scripts on their own pipelines.
Kinds with bookkeeping beside the record: `shards` (WebDataset shard jobs), `clips` (multi-clip
V-JEPA 2 jobs).
"""

from __future__ import annotations

from tasks.jobstore.faces import AsyncJobs, Call, Jobs, cancel_call, detach_call, fail_call, finish_call, progress_call, queue, start_call, unstart_call
from tasks.jobstore.lua import CANCEL_LUA, DETACH_LUA, FINISH_LUA, NOTIFY, PROGRESS_LUA, START_LUA, TERMINAL_FN, UNSTART_LUA
from tasks.jobstore.record import LIFETIMES, create, dead_letter, error, job_key, keep, new_record, now, parse_record, reply_payload

__all__ = [
    "CANCEL_LUA",
    "DETACH_LUA",
    "FINISH_LUA",
    "LIFETIMES",
    "NOTIFY",
    "PROGRESS_LUA",
    "START_LUA",
    "TERMINAL_FN",
    "UNSTART_LUA",
    "AsyncJobs",
    "Call",
    "Jobs",
    "cancel_call",
    "create",
    "dead_letter",
    "detach_call",
    "error",
    "fail_call",
    "finish_call",
    "job_key",
    "keep",
    "new_record",
    "now",
    "parse_record",
    "progress_call",
    "queue",
    "reply_payload",
    "start_call",
    "unstart_call",
]
