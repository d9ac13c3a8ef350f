-- step: append one step record to a running run's history, if the caller holds the current token.
-- The history is append-only, so a write costs the same at step 200 as at step 1.
-- KEYS[1] leases
-- KEYS[2] steps
-- ARGV[1] run id
-- ARGV[2] fencing token
-- ARGV[3] step record (one JSON line, newline-terminated)
-- RETURNS {C.OK} | {C.STALE}
--!include common

if redis.call('HGET', K.leases, ARGV[1]) ~= ARGV[2] then
  return {C.STALE}
end
history_append(K.steps, ARGV[1], ARGV[3])
return {C.OK}
