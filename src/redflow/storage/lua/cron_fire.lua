-- cron_fire: fire a cron trigger's time slot at most once. The slot fires only when it is later than
-- the last slot fired or skipped for the trigger, so leader changes, racing leaders and redeploys
-- cannot fire a slot twice; the run id is derived from (trigger, slot) as well. A slot is skipped
-- (and recorded as handled) when the workflow already has ARGV[8] runs running.
-- KEYS[1] cron_last
-- KEYS[2] runs
-- KEYS[3] inputs
-- KEYS[4] index
-- KEYS[5] ready        q:<queue>:ready
-- KEYS[6] scheduled    q:<queue>:sched
-- KEYS[7] bell         q:<queue>:bell
-- KEYS[8] children
-- KEYS[9] running      workflow -> number of its runs running now
-- ARGV[1] trigger id
-- ARGV[2] slot, epoch ms
-- ARGV[3] run id for this slot
-- ARGV[4] workflow name
-- ARGV[5] queue name
-- ARGV[6] input JSON
-- ARGV[7] max attempts
-- ARGV[8] max concurrency (0 = unlimited)
-- RETURNS {C.CREATED, run id} | {C.EXISTING} (slot already handled) | {C.OK, 'skipped'}
--       | {C.NOT_FOUND} (slot in the future)
--!include common
--!include runs

local slot = tonumber(ARGV[2])
local now = now_ms()
if slot > now then return {C.NOT_FOUND} end
local last = redis.call('HGET', KEYS[1], ARGV[1])
if last and tonumber(last) >= slot then return {C.EXISTING} end
redis.call('HSET', KEYS[1], ARGV[1], slot)
local limit = tonumber(ARGV[8])
if limit > 0 then
  local running = tonumber(redis.call('HGET', KEYS[9], ARGV[4]) or 0)
  if running >= limit then return {C.OK, 'skipped'} end
end
if redis.call('HEXISTS', KEYS[2], ARGV[3]) == 1 then return {C.EXISTING} end
create_run({runs = KEYS[2], inputs = KEYS[3], index = KEYS[4], ready = KEYS[5], sched = KEYS[6],
  bell = KEYS[7], children = KEYS[8]}, ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]), 0, '', '', now)
return {C.CREATED, ARGV[3]}
