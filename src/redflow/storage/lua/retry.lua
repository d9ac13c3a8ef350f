-- retry: schedule the run again ARGV[3] ms from now (server time): a failed attempt that will be
-- retried, or (ARGV[5] = 1) a run deferred without ending its attempt, e.g. one this worker cannot
-- execute because it lacks the workflow's definition.
-- KEYS[1] runs
-- KEYS[2] leases
-- KEYS[3] errors
-- KEYS[4] index
-- KEYS[5] owned        owned:<worker id>
-- KEYS[6] scheduled    q:<queue>:sched
-- KEYS[7] bell         q:<queue>:bell
-- KEYS[8] limits
-- KEYS[9] held
-- KEYS[10] ready       q:<queue>:ready
-- KEYS[11] steps
-- KEYS[12] mutexes
-- ARGV[1] run id
-- ARGV[2] fencing token
-- ARGV[3] delay in ms
-- ARGV[4] error JSON of the failed attempt
-- ARGV[5] 1 to keep the attempt number (deferral), 0 to start a new attempt when claimed
-- RETURNS C.OK | C.STALE | C.CANCELED (its cancellation was requested: end it as canceled instead)
--!include common

local id = ARGV[1]
if redis.call('HGET', KEYS[2], id) ~= ARGV[2] then
  return C.STALE
end
local h = cjson.decode(redis.call('HGET', KEYS[1], id))
if h.cr then
  return C.CANCELED
end
local now = now_ms()
local due = now + tonumber(ARGV[3])
if ARGV[5] ~= '1' then attempt_line(KEYS[11], id, h, 'failed', ARGV[4], now) end
h.av = due
h.o = nil
h.e = 1  -- an error is stored: a later success clears it
if ARGV[5] == '1' then h.rc = 1 end
set_status(KEYS[4], id, h, 'scheduled')
redis.call('HSET', KEYS[1], id, cjson.encode(h))
redis.call('HSET', KEYS[3], id, ARGV[4])
redis.call('HDEL', KEYS[2], id)
redis.call('SREM', KEYS[5], id)
local head = redis.call('ZRANGE', KEYS[6], 0, 0, 'WITHSCORES')
redis.call('ZADD', KEYS[6], due, id)
if not head[2] or due < tonumber(head[2]) then ring(KEYS[7]) end
release_held({runs = KEYS[1], index = KEYS[4], limits = KEYS[8], held = KEYS[9], ready = KEYS[10],
  bell = KEYS[7]}, h.q, h.w)
release_mutex({runs = KEYS[1], mutexes = KEYS[12], held = KEYS[9], ready = KEYS[10], bell = KEYS[7]}, id, h)
return C.OK
