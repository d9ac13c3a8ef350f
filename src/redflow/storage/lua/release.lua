-- release: a stopping worker hands a run back. It goes to the claim end of its queue and keeps its
-- attempt number (h.rc); this is not counted as a crash. A failed run with a pending hook is requeued
-- for its hook.
-- KEYS[1] runs
-- KEYS[2] leases
-- KEYS[3] index
-- KEYS[4] owned        owned:<worker id>
-- KEYS[5] ready        q:<queue>:ready
-- KEYS[6] bell         q:<queue>:bell
-- KEYS[7] limits
-- KEYS[8] held
-- KEYS[9] mutexes
-- ARGV[1] run id
-- ARGV[2] fencing token
-- RETURNS C.OK | C.STALE
--!include common

local id = ARGV[1]
if redis.call('HGET', KEYS[2], id) ~= ARGV[2] then
  return C.STALE
end
local h = cjson.decode(redis.call('HGET', KEYS[1], id))
h.o = nil
if h.s == 'running' then
  h.rc = 1
  set_status(KEYS[3], id, h, 'queued')
end
redis.call('HSET', KEYS[1], id, cjson.encode(h))
redis.call('HDEL', KEYS[2], id)
redis.call('SREM', KEYS[4], id)
redis.call('RPUSH', KEYS[5], id)
ring(KEYS[6])
release_held({runs = KEYS[1], index = KEYS[3], limits = KEYS[7], held = KEYS[8], ready = KEYS[5],
  bell = KEYS[6]}, h.q, h.w)
release_mutex({runs = KEYS[1], mutexes = KEYS[9], held = KEYS[8], ready = KEYS[5], bell = KEYS[6]}, id, h)
return C.OK
