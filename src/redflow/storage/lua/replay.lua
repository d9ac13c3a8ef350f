-- replay: create run ARGV[1] as a replay of ended run ARGV[6]: queued now on its queue, recording
-- `replayed_from` (h.rf), with the given input and the history lines ARGV[7..] copied from the
-- original (the steps it reuses), so those steps return their recorded outputs without running.
-- KEYS[1] runs
-- KEYS[2] inputs
-- KEYS[3] index
-- KEYS[4] steps
-- KEYS[5] children
-- KEYS[6] ready        q:<queue>:ready
-- KEYS[7] scheduled    q:<queue>:sched
-- KEYS[8] bell         q:<queue>:bell
-- ARGV[1] new run id
-- ARGV[2] workflow name
-- ARGV[3] queue name
-- ARGV[4] input JSON
-- ARGV[5] max attempts
-- ARGV[6] id of the run replayed
-- ARGV[7..] history lines to copy, in order
-- RETURNS {C.CREATED, run id} | {C.EXISTING, run id} | {C.NOT_FOUND} (the original is gone)
--       | {C.WRONG_STATUS, status} (the original has not ended)
--!include common
--!include runs

local id, source = ARGV[1], ARGV[6]
if redis.call('HEXISTS', K.runs, id) == 1 then return {C.EXISTING, id} end
local raw = redis.call('HGET', K.runs, source)
if not raw then return {C.NOT_FOUND} end
local s = decode_run(raw).s
if not is_terminal(s) then return {C.WRONG_STATUS, s} end
for i = 7, #ARGV do history_append(K.steps, id, ARGV[i]) end
local h = create_run({runs = K.runs, inputs = K.inputs, index = K.index, ready = K.ready, sched = K.scheduled,
  bell = K.bell, children = K.children}, id, ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), 0, '', '', now_ms())
h.rf = source
redis.call('HSET', K.runs, id, encode_run(h))
return {C.CREATED, id}
