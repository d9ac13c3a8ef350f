-- hook_done: the on_failure hook of a failed run has run; release the run. A parent still waiting
-- for it (possible when the reaper failed it as crashed) is resumed with the outcome 'failed'.
-- KEYS[1] runs
-- KEYS[2] leases
-- KEYS[3] owned        owned:<worker id>
-- KEYS[4] index        (KEYS[4..11] only when the run has a waiting parent)
-- KEYS[5] errors
-- KEYS[6] waits
-- KEYS[7] waiters
-- KEYS[8] steps
-- KEYS[9] parent ready
-- KEYS[10] parent sched
-- KEYS[11] parent bell
-- ARGV[1] run id
-- ARGV[2] fencing token
-- RETURNS C.OK | C.STALE
--!include common

local id = ARGV[1]
if redis.call('HGET', KEYS[2], id) ~= ARGV[2] then
  return C.STALE
end
local h = cjson.decode(redis.call('HGET', KEYS[1], id))
h.h = nil
h.o = nil
redis.call('HSET', KEYS[1], id, cjson.encode(h))
redis.call('HDEL', KEYS[2], id)
redis.call('SREM', KEYS[3], id)
if h.pq and #KEYS >= 11 then
  resume_waiter({runs = KEYS[1], index = KEYS[4], waits = KEYS[6], waiters = KEYS[7], steps = KEYS[8],
    ready = KEYS[9], sched = KEYS[10], bell = KEYS[11]}, h.p, 'child', id, 'failed',
    redis.call('HGET', KEYS[5], id) or 'null', now_ms())
end
return C.OK
