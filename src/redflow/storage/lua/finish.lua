-- finish: end a running run as succeeded, failed or canceled, if the caller holds the current token.
-- A run whose cancellation was requested ends as canceled whatever the handler returned. With
-- ARGV[5] = 1 a failure keeps the run owned (token and owned set) until its on_failure hook has run;
-- hook_done releases it: the terminal status is durable before any hook runs. When a parent waits
-- for this run (h.pq), the parent's wait is resolved and the parent queued again.
-- KEYS[1] runs
-- KEYS[2] leases
-- KEYS[3] results
-- KEYS[4] errors
-- KEYS[5] index
-- KEYS[6] expiry
-- KEYS[7] owned        owned:<worker id>
-- KEYS[8] limits
-- KEYS[9] held
-- KEYS[10] ready       q:<queue>:ready (held runs of the workflow are released into it)
-- KEYS[11] bell        q:<queue>:bell
-- KEYS[12] steps        (the end of the attempt is recorded in the history)
-- KEYS[13] mutexes
-- KEYS[14] stream       stream:<run id> (exists only if the run streamed values)
-- KEYS[15] waits        (KEYS[15..19] only when the run has a waiting parent)
-- KEYS[16] waiters
-- KEYS[17] parent ready   q:<parent queue>:ready
-- KEYS[18] parent sched   q:<parent queue>:sched
-- KEYS[19] parent bell    q:<parent queue>:bell
-- ARGV[1] run id
-- ARGV[2] fencing token
-- ARGV[3] status ('succeeded' | 'failed' | 'canceled')
-- ARGV[4] output JSON (succeeded) or error JSON (failed, canceled)
-- ARGV[5] 1 when an on_failure hook must run, else 0
-- ARGV[6] retention in ms
-- ARGV[7] done channel of the run
-- ARGV[8] flags: 's' when the workflow streams (end its stream), 'c' when it has a max_concurrency
-- RETURNS {C.OK, final status} | {C.STALE}
--!include common

local id = ARGV[1]
if redis.call('HGET', KEYS[2], id) ~= ARGV[2] then
  return {C.STALE}
end
local h = cjson.decode(redis.call('HGET', KEYS[1], id))
local now = now_ms()
local status, payload, hook = ARGV[3], ARGV[4], ARGV[5]
if h.cr then
  status, payload, hook = 'canceled', canceled_error(id, h, h.cx or ''), '0'
end
h.f = now
if status ~= 'succeeded' then
  -- A succeeded attempt's trace is the run itself; other endings are recorded in the history.
  attempt_line(KEYS[12], id, h, status, payload, now)
end
set_status(KEYS[5], id, h, status)
if status == 'succeeded' then
  redis.call('HSET', KEYS[3], id, payload)
  if h.e then
    redis.call('HDEL', KEYS[4], id)
    h.e = nil
  end
else
  redis.call('HSET', KEYS[4], id, payload)
end
if hook == '1' then
  h.h = 1
else
  h.o = nil
  redis.call('HDEL', KEYS[2], id)
  redis.call('SREM', KEYS[7], id)
end
redis.call('HSET', KEYS[1], id, cjson.encode(h))
redis.call('ZADD', KEYS[6], now + tonumber(ARGV[6]), id)
-- The message carries the outcome when it is small, so a waiting result() needs no read.
if #payload <= 16384 then
  redis.call('PUBLISH', ARGV[7], status .. '\n' .. payload)
else
  redis.call('PUBLISH', ARGV[7], status)
end
local flags = ARGV[8] or ''
if string.find(flags, 's', 1, true) and redis.call('EXISTS', KEYS[14]) == 1 then
  redis.call('XADD', KEYS[14], '*', 'end', status)  -- tells stream readers the run ended
end
if string.find(flags, 'c', 1, true) then
  release_held({runs = KEYS[1], index = KEYS[5], limits = KEYS[8], held = KEYS[9], ready = KEYS[10],
    bell = KEYS[11]}, h.q, h.w)
end
release_mutex({runs = KEYS[1], mutexes = KEYS[13], held = KEYS[9], ready = KEYS[10], bell = KEYS[11]}, id, h)
if h.pq and #KEYS >= 19 then
  resume_waiter({runs = KEYS[1], index = KEYS[5], waits = KEYS[15], waiters = KEYS[16], steps = KEYS[12],
    ready = KEYS[17], sched = KEYS[18], bell = KEYS[19]}, h.p, 'child', id, status, payload, now)
end
return {C.OK, status}
