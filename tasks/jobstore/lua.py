"""The job record's transitions as Lua scripts, generated from the one terminal set `keys.TERMINAL`.

Every script that asks "is this job over?" calls `terminal(st)`, whose body is written here from
`keys.TERMINAL`; no script spells the statuses out. Each transition to a terminal status also
queues the job's webhook (`NOTIFY`) in the same script, so no caller can forget it.
"""

from __future__ import annotations

from tasks import keys


def terminal_function() -> str:
    """`local function terminal(st)`: true for a status in `keys.TERMINAL` (sorted, so the text is
    stable); and `job_status(key)`: the job's decoded status, nil without a record."""
    return (
        "local function terminal(st) return " + " or ".join(f"st == '{s}'" for s in sorted(keys.TERMINAL)) + " end\n"
        "local function job_status(key) local s = redis.call('HGET', key, 'status') if s then return cjson.decode(s) end end\n"
    )


TERMINAL_FN = terminal_function()

# A job that reaches a terminal state with a `callback_url` in its doc is queued for the
# API's webhook sender in the same script (no extra round trip). The queue key is written
# into the script rather than passed in KEYS so every caller of these scripts (runners with
# their own finishing paths too) queues webhooks without changing its call.
NOTIFY = """
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
START_LUA = (
    TERMINAL_FN
    + """
local st = job_status(KEYS[1])
if not st then return {'missing', 0} end
if terminal(st) then
  return {st, tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')}
end
local n = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if n > tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'status', '"failed"', 'finished_at', ARGV[1],
    'error', cjson.encode({code='dead_lettered', status=500, message='delivered ' .. (n - 1) ..
      ' times without finishing (the worker died each time); not retried'}))
"""
    + NOTIFY
    + """
  return {'dead', n}
end
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'status', '"running"', 'started_at', ARGV[1])
end
if ARGV[3] then redis.call('HSET', KEYS[1], 'worker', ARGV[3]) end
return {'running', n}
"""
)

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
# Redis could not record is never acked (workers/service.py retries it). The shebang must stay
# the script's first line, so the terminal function comes after it.
FINISH_LUA = (
    "#!lua\n"
    + TERMINAL_FN
    + """local st = job_status(KEYS[1])
if not st then return 0 end
if terminal(st) then return 0 end
local detached = redis.call('HEXISTS', KEYS[1], 'detached') == 1
if detached and ARGV[8] == '1' then return -1 end
redis.call('HSET', KEYS[1], 'status', cjson.encode(ARGV[1]), 'finished_at', ARGV[2], ARGV[3], ARGV[4])
if ARGV[7] and ARGV[7] ~= '' and not detached then redis.call('EXPIRE', KEYS[1], ARGV[7]) end
if ARGV[5] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[6]) end
"""
    + NOTIFY
    + """
return 1
"""
)

# The API gave up waiting on a sync request (504): from now on it is a job like any other.
# KEYS[1]=job KEYS[2]=tombstone  ARGV[1]=RESULT_TTL_SECONDS ARGV[2]=tombstone TTL ARGV[3]=tenant
# ARGV[4]='1' to detach a finished one too (the other samples of a tar call that timed out)
# returns the status: a finished record is left as it is unless forced (the API answers it
# instead of 504), 'detached' when it now has the job lifetime and a tombstone, 'missing'.
DETACH_LUA = (
    TERMINAL_FN
    + """
local st = job_status(KEYS[1])
if not st then return 'missing' end
if terminal(st) and ARGV[4] ~= '1' then return st end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], 'detached', '1')
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[2])
return 'detached'
"""
)

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

# KEYS[1]=job ARGV[1]=now  → the status it had when already over, 'cancelled', or 'missing'
CANCEL_LUA = (
    TERMINAL_FN
    + """
local st = job_status(KEYS[1])
if not st then return 'missing' end
if terminal(st) then return st end
redis.call('HSET', KEYS[1], 'status', '"cancelled"', 'finished_at', ARGV[1])
"""
    + NOTIFY
    + """
return 'cancelled'
"""
)

# KEYS[1]=job ARGV[1]=progress json  → the job's status after ('missing' without a record);
# progress of a job that is over is not written (a late report must not overwrite its last one)
PROGRESS_LUA = (
    TERMINAL_FN
    + """
local st = job_status(KEYS[1])
if not st then return 'missing' end
if not terminal(st) then redis.call('HSET', KEYS[1], 'progress', ARGV[1]) end
return st
"""
)
