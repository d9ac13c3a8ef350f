-- cleanup: delete up to ARGV[1] runs and up to ARGV[1] events whose retention deadline has passed,
-- with every index entry and record they own (a run's entries for children in other partitions
-- included), and the outcomes of children of other partitions kept here past their retention. Copies of other partitions' events (handoff_event)
-- expire the same way and are not counted.
-- KEYS[1] runs
-- KEYS[2] inputs
-- KEYS[3] results
-- KEYS[4] errors
-- KEYS[5] steps
-- KEYS[6] leases
-- KEYS[7] index
-- KEYS[8] expiry
-- KEYS[9] children
-- KEYS[10] events
-- KEYS[11] event_data
-- KEYS[12] event_index
-- KEYS[13] event_expiry
-- KEYS[14] event_buffer
-- KEYS[15] attempts
-- KEYS[16] event_copies
-- KEYS[17] child_ends
-- KEYS[18] child_end_expiry
-- ARGV[1] max runs (and max events) to delete
-- ARGV[2] cut-off in epoch ms (0 = server time now)
-- ARGV[3] what to delete: 'runs', 'events' or 'both'
-- RETURNS {C.OK, runs deleted, events deleted}
--!include common

local cutoff = tonumber(ARGV[2])
if cutoff == 0 then cutoff = now_ms() end
local limit = tonumber(ARGV[1])
local ids = {}
if ARGV[3] ~= 'events' then
  ids = redis.call('ZRANGEBYSCORE', KEYS[8], '-inf', cutoff, 'LIMIT', 0, limit)
end
for _, id in ipairs(ids) do
  local raw = redis.call('HGET', KEYS[1], id)
  if raw then
    local h = decode_run(raw)
    local wf = wf_tag(h)
    redis.call('ZREM', KEYS[7], 's:' .. h.s .. ':' .. id, 'ws:' .. wf .. ':' .. h.s .. ':' .. id)
    if h.p then redis.call('ZREM', KEYS[9], h.p .. ':' .. id) end
    local here = string.match(id, '%-p(%d+)$')
    local from = id .. ':'
    for _, member in ipairs(redis.call('ZRANGEBYLEX', KEYS[9], '[' .. from, '[' .. from .. '\255')) do
      local child = string.sub(member, #from + 1)
      if string.match(child, '%-p(%d+)$') ~= here then  -- indexed here, living elsewhere
        redis.call('ZREM', KEYS[9], member)
      end
    end
    for a = 1, h.a do redis.call('HDEL', KEYS[15], id .. ':' .. a) end
  end
  redis.call('HDEL', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
  redis.call('HDEL', KEYS[4], id)
  history_delete(KEYS[5], id)
  redis.call('HDEL', KEYS[6], id)
  redis.call('ZREM', KEYS[8], id)
end
if ARGV[3] ~= 'events' then  -- not counted: copies, like an event's copies below
  for _, child in ipairs(redis.call('ZRANGEBYSCORE', KEYS[18], '-inf', cutoff, 'LIMIT', 0, limit)) do
    redis.call('HDEL', KEYS[17], child)
    redis.call('ZREM', KEYS[18], child)
  end
end
local events = {}
if ARGV[3] ~= 'runs' then
  events = redis.call('ZRANGEBYSCORE', KEYS[13], '-inf', cutoff, 'LIMIT', 0, limit)
end
local copies = 0
for _, id in ipairs(events) do
  local raw = redis.call('HGET', KEYS[10], id)
  local copy = redis.call('HGET', KEYS[16], id)
  if copy then
    redis.call('ZREM', KEYS[14], copy)
    redis.call('HDEL', KEYS[16], id)
    copies = copies + 1
  end
  if raw then
    local rec = cjson.decode(raw)
    local ts = string.format('%013d', rec.ts)
    redis.call('ZREM', KEYS[12], 'a:' .. ts .. ':' .. id,
      'n:' .. string.len(rec.name) .. ':' .. rec.name .. ':' .. ts .. ':' .. id)
    if rec.buffer_member then redis.call('ZREM', KEYS[14], rec.buffer_member) end
  end
  redis.call('HDEL', KEYS[10], id)
  redis.call('HDEL', KEYS[11], id)
  redis.call('ZREM', KEYS[13], id)
end
return {C.OK, #ids, #events - copies}
