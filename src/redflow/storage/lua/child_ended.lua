-- child_ended: apply here the end of a child that lives in another partition (an entry of that
-- partition's outbox): keep its outcome in child_ends for the retention period, where a later wait
-- on it finds it (suspend), and resume every run of this partition waiting for it now (its parent,
-- and any run that joined it by idempotency key, even after the parent is gone). Applying it again
-- changes nothing: the outcome is the same and a resumed run waits no more.
-- KEYS[1] runs
-- KEYS[2] index
-- KEYS[3] waits
-- KEYS[4] waiters
-- KEYS[5] steps
-- KEYS[6] child_ends
-- KEYS[7] child_end_expiry
-- KEYS[8..] queues     ready, sched, bell of each queue named in ARGV[5]
-- ARGV[1] child run id
-- ARGV[2] retention of the outcome, in ms
-- ARGV[3] the child's final status
-- ARGV[4] its output (succeeded) or error JSON
-- ARGV[5] queues: the waiting runs' queues, one per line
-- RETURNS {C.OK, id of each run resumed ...} | {C.NEED_QUEUES, missing queue, ...}
--!include common

local child = ARGV[1]
local missing = {}
local waiting = event_waiters(KEYS[1], KEYS[4], 'c:' .. child .. ':', K.queues, missing)
if #missing > 0 then return need_queues(missing) end
local now = now_ms()
redis.call('HSET', KEYS[6], child, ARGV[3] .. '\n' .. ARGV[4])
redis.call('ZADD', KEYS[7], now + tonumber(ARGV[2]), child)
local out = {C.OK}
for _, wr in ipairs(waiting) do
  local q = K.queues[wr.q]
  local w = resume_waiter({runs = KEYS[1], index = KEYS[2], waits = KEYS[3], waiters = KEYS[4], steps = KEYS[5],
    ready = q.ready, sched = q.sched, bell = q.bell}, wr.id, 'child', child, ARGV[3], ARGV[4], now)
  if w then out[#out + 1] = wr.id end
end
return out
