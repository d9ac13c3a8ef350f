-- stream_write: append a value to a running run's stream, if the caller holds the current token.
-- The stream key carries a TTL of the retention window, renewed by every write.
-- KEYS[1] leases
-- KEYS[2] stream       stream:<run id>
-- ARGV[1] run id
-- ARGV[2] fencing token
-- ARGV[3] attempt
-- ARGV[4] value JSON
-- ARGV[5] retention in ms
-- ARGV[6] max entries kept (approximate)
-- RETURNS {C.OK, entry id, server time ms} | {C.STALE}
--!include common

if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return {C.STALE}
end
local now = now_ms()
local entry = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'a', ARGV[3], 't', now, 'v', ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return {C.OK, entry, now}
