-- finish: end a running run as succeeded or failed, if the caller holds the current token.
-- With ARGV[5] = 1 the failure keeps the run owned (token and owned set) until its on_failure hook
-- has run; hook_done releases it. The terminal status is durable before any hook runs.
-- KEYS[1] runs
-- KEYS[2] leases
-- KEYS[3] results
-- KEYS[4] errors
-- KEYS[5] index
-- KEYS[6] expiry
-- KEYS[7] owned        owned:<worker id>
-- ARGV[1] run id
-- ARGV[2] fencing token
-- ARGV[3] status ('succeeded' | 'failed')
-- ARGV[4] output JSON (succeeded) or error JSON (failed)
-- ARGV[5] 1 when an on_failure hook must run, else 0
-- ARGV[6] retention in ms
-- ARGV[7] done channel of the run
-- RETURNS C.OK | C.STALE
--!include common

local id = ARGV[1]
if redis.call('HGET', KEYS[2], id) ~= ARGV[2] then
  return C.STALE
end
local h = cjson.decode(redis.call('HGET', KEYS[1], id))
local now = now_ms()
h.f = now
set_status(KEYS[5], id, h, ARGV[3])
if ARGV[3] == 'succeeded' then
  redis.call('HSET', KEYS[3], id, ARGV[4])
  redis.call('HDEL', KEYS[4], id)
else
  redis.call('HSET', KEYS[4], id, ARGV[4])
end
if ARGV[5] == '1' then
  h.h = 1
else
  h.o = nil
  redis.call('HDEL', KEYS[2], id)
  redis.call('SREM', KEYS[7], id)
end
redis.call('HSET', KEYS[1], id, cjson.encode(h))
redis.call('ZADD', KEYS[6], now + tonumber(ARGV[6]), id)
redis.call('PUBLISH', ARGV[7], ARGV[3])
return C.OK
