-- handoff_done: an outbox entry of this partition was applied in its target partition: remove the
-- entry (and its data), and for an event add the runs it resumed there to the event's record, so
-- that the record lists every run the event resumed in any partition. Only the applier that
-- removes the entry adds its runs: a second applier of the same entry was answered EXISTING by the
-- target and resumed nothing.
-- KEYS[1] outbox
-- KEYS[2] events
-- KEYS[3] outbox_data
-- ARGV[1] outbox member
-- ARGV[2] event id ('' for a hand-off of a child run)
-- ARGV[3..] ids of the runs the hand-off resumed
-- RETURNS {C.OK} | {C.NOT_FOUND} (the entry was gone: nothing changed)

if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return {C.NOT_FOUND} end
redis.call('HDEL', KEYS[3], ARGV[1])
if #ARGV < 3 or ARGV[2] == '' then return {C.OK} end
local raw = redis.call('HGET', KEYS[2], ARGV[2])
if not raw then return {C.OK} end
local rec = cjson.decode(raw)
local ids = rec.resumed_run_ids
if type(ids) ~= 'table' then ids = {} end
local seen = {}
for _, rid in ipairs(ids) do seen[rid] = true end
for i = 3, #ARGV do
  if not seen[ARGV[i]] then ids[#ids + 1] = ARGV[i]; seen[ARGV[i]] = true end
end
rec.resumed_run_ids = ids
rec.resumed_run_count = #ids
redis.call('HSET', KEYS[2], ARGV[2], cjson.encode(rec))
return {C.OK}
