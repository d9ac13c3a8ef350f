-- resume_input: resume a run waiting for input (wait_for_input). The waiting step (or the handler,
-- when it raised the wait itself) runs again with the form; recorded steps are kept and the attempt
-- is not consumed. Optionally the run's input is replaced.
-- KEYS[1] runs
-- KEYS[2] inputs
-- KEYS[3] index
-- KEYS[4] waits
-- KEYS[5] waiters
-- KEYS[6] steps
-- KEYS[7] ready        q:<queue>:ready
-- KEYS[8] scheduled    q:<queue>:sched
-- KEYS[9] bell         q:<queue>:bell
-- ARGV[1] run id
-- ARGV[2] form JSON
-- ARGV[3] new input JSON ('' = keep the input)
-- RETURNS {C.OK} | {C.NOT_FOUND} (not waiting for input) | {C.TERMINAL, status}
--!include common

local id = ARGV[1]
local raw = redis.call('HGET', KEYS[1], id)
if not raw then return {C.NOT_FOUND} end
local h = decode_run(raw)
if is_terminal(h.s) then return {C.TERMINAL, h.s} end
local w = resume_waiter({runs = KEYS[1], index = KEYS[3], waits = KEYS[4], waiters = KEYS[5], steps = KEYS[6],
  ready = KEYS[7], sched = KEYS[8], bell = KEYS[9]}, id, 'input', nil, 'input', ARGV[2], now_ms())
if not w then return {C.NOT_FOUND} end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], id, ARGV[3]) end
return {C.OK}
