-- step: append one step record to a running run's history, if the caller holds the current token.
-- KEYS[1] leases
-- KEYS[2] steps
-- ARGV[1] run id
-- ARGV[2] fencing token
-- ARGV[3] step record (one JSON line, newline-terminated)
-- RETURNS C.OK | C.STALE

if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return C.STALE
end
local history = redis.call('HGET', KEYS[2], ARGV[1])
if history then
  redis.call('HSET', KEYS[2], ARGV[1], history .. ARGV[3])
else
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
end
return C.OK
