-- handoff_event: apply here an event recorded in another partition of the prefix (an entry of that
-- partition's outbox): keep a copy of its data, add it to this partition's event buffer, and resume
-- this partition's runs waiting for its name and correlation key, as emit does where it is recorded.
-- Applied at most once per partition: the inbox keeps applied event ids for a day, so an applier
-- that dies between applying and removing the outbox entry, or two appliers at once, change nothing.
-- KEYS[1] runs
-- KEYS[2] index
-- KEYS[3] waits
-- KEYS[4] waiters
-- KEYS[5] steps
-- KEYS[6] event_data
-- KEYS[7] event_expiry
-- KEYS[8] event_buffer
-- KEYS[9] event_copies
-- KEYS[10] inbox
-- KEYS[11..] queues      ready, sched, bell of each queue named in ARGV[7]
-- ARGV[1] event id
-- ARGV[2] the event's data record JSON, as its partition keeps it in event_data
-- ARGV[3] waiter and buffer member prefix (<len>:<event>:<len>:<key>:)
-- ARGV[4] the event's time, epoch ms (the time in its buffer member)
-- ARGV[5] event buffer bound per (event, key)
-- ARGV[6] retention of the copy, in ms
-- ARGV[7] queues: the waiters' queues the caller expects, one per line
-- RETURNS {C.OK, id of each run resumed ...} | {C.EXISTING} (applied here before)
--       | {C.NEED_QUEUES, missing queue, ...}
--!include common
--!include runs

local INBOX_MS = 86400000
local id = ARGV[1]
if redis.call('ZSCORE', KEYS[10], id) then return {C.EXISTING} end

local prefix = ARGV[3]
local queues = K.queues
local missing = {}
local waiting = event_waiters(KEYS[1], KEYS[4], prefix, queues, missing)
if #missing > 0 then return need_queues(missing) end

local now = now_ms()
local data = ARGV[2]
redis.call('HSET', KEYS[6], id, data)
redis.call('ZADD', KEYS[7], now + tonumber(ARGV[6]), id)
local member = prefix .. string.format('%013d', tonumber(ARGV[4])) .. ':' .. id
redis.call('HSET', KEYS[9], id, member)
local out = {C.OK}
for _, wr in ipairs(waiting) do
  local q = queues[wr.q]
  local w = resume_waiter({runs = KEYS[1], index = KEYS[2], waits = KEYS[3], waiters = KEYS[4], steps = KEYS[5],
    ready = q.ready, sched = q.sched, bell = q.bell}, wr.id, 'event', nil, 'event', data, now)
  if w then out[#out + 1] = wr.id end
end
buffer_event(KEYS[8], prefix, member, tonumber(ARGV[5]))
redis.call('ZADD', KEYS[10], now, id)
redis.call('ZREMRANGEBYSCORE', KEYS[10], '-inf', now - INBOX_MS)
return out
