-- hook_done: the on_failure hook of a failed run has run; release the run.
-- KEYS[1] runs
-- KEYS[2] leases
-- KEYS[3] owned        owned:<worker id>
-- ARGV[1] run id
-- ARGV[2] fencing token
-- RETURNS C.OK | C.STALE

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
return C.OK
