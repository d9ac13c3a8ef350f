-- step_many: step.lua for several step records the runs of one worker wrote in the same loop tick,
-- in one call. Each record is decided on its own, in ARGV order, exactly as step.lua decides one:
-- appended to its run's history if the caller holds the run's current token and the run is running.
-- KEYS[1] leases
-- KEYS[2] steps
-- KEYS[3] runs
-- ARGV[1..] steps     three values per record: run id, fencing token, step record (one JSON line,
--                     newline-terminated)
-- RETURNS {C.OK, code 1, code 2, ...}, a code per record in ARGV order: C.OK | C.STALE | C.WRONG_STATUS
--!include common

local out = {C.OK}
for at = 1, #ARGV, 3 do
  local id = ARGV[at]
  local code = C.OK
  if redis.call('HGET', K.leases, id) ~= ARGV[at + 1] then
    code = C.STALE
  else
    local header = redis.call('HGET', K.runs, id)
    if not header or decode_run(header).s ~= 'running' then
      code = C.WRONG_STATUS
    else
      history_append(K.steps, id, ARGV[at + 2])
    end
  end
  out[#out + 1] = code
end
return out
