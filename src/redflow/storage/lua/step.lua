-- step: append one step record to a running run's history, if the caller holds the current token.
-- The history is append-only, so a write costs the same at step 200 as at step 1. A failed run
-- whose on_failure hook is pending still holds its lease: the status check refuses step writes then.
-- KEYS[1] leases
-- KEYS[2] steps
-- KEYS[3] runs
-- ARGV[1] run id
-- ARGV[2] fencing token
-- ARGV[3] step record (one JSON line, newline-terminated)
-- RETURNS {C.OK} | {C.STALE} | {C.WRONG_STATUS}
--!include common

if redis.call('HGET', K.leases, ARGV[1]) ~= ARGV[2] then
  return {C.STALE}
end
local header = redis.call('HGET', K.runs, ARGV[1])
if not header or decode_run(header).s ~= 'running' then
  return {C.WRONG_STATUS}
end
history_append(K.steps, ARGV[1], ARGV[3])
return {C.OK}
