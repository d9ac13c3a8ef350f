-- suspend: a running run starts a durable wait (sleep, event or child) and leaves its worker until
-- the wait is resolved: by its deadline (claim promotes it), an event (emit) or the child's end
-- (finish/cancel of the child). A wait that can be satisfied at once is resolved here instead.
-- KEYS[1] runs
-- KEYS[2] leases
-- KEYS[3] index
-- KEYS[4] owned        owned:<worker id>
-- KEYS[5] steps
-- KEYS[6] waits
-- KEYS[7] waiters
-- KEYS[8] scheduled    q:<queue>:sched
-- KEYS[9] bell         q:<queue>:bell
-- KEYS[10] results
-- KEYS[11] errors
-- KEYS[12] event buffer
-- KEYS[13] event data
-- KEYS[14] limits
-- KEYS[15] held
-- KEYS[16] ready       q:<queue>:ready
-- KEYS[17] mutexes
-- ARGV[1] run id
-- ARGV[2] fencing token
-- ARGV[3] step name
-- ARGV[4] step position
-- ARGV[5] kind: 'sleep' | 'event' | 'child' | 'input'
-- ARGV[6] delay in ms from now (-1 = no deadline)
-- ARGV[7] absolute deadline, epoch ms (0 = use the delay)
-- ARGV[8] waiter member for an event wait ('' otherwise)
-- ARGV[9] child run id for a child wait ('' otherwise)
-- ARGV[10] event buffer member prefix (<len>:<event>:<len>:<key>:) for an event wait ('' otherwise)
-- ARGV[11] details of an input wait as JSON ({msg, schema}), '' otherwise
-- ARGV[12..] ids of events earlier wait steps of this run consumed
-- RETURNS {C.OK, deadline ms or -1} | {C.RESOLVED, resolution, output JSON} | {C.STALE}
--       | {C.CANCELED}
--!include common

local id = ARGV[1]
if redis.call('HGET', KEYS[2], id) ~= ARGV[2] then
  return {C.STALE}
end
local h = cjson.decode(redis.call('HGET', KEYS[1], id))
if h.cr then
  return {C.CANCELED}
end
local now = now_ms()
local kind = ARGV[5]
local w = {n = ARGV[3], q = tonumber(ARGV[4]), k = kind}

if kind == 'child' then
  w.ch = ARGV[9]
  local raw = redis.call('HGET', KEYS[1], w.ch)
  if raw then
    local child = cjson.decode(raw)
    if child.s == 'succeeded' or child.s == 'failed' or child.s == 'canceled' then
      local outcome_key = KEYS[11]
      if child.s == 'succeeded' then outcome_key = KEYS[10] end
      local out = redis.call('HGET', outcome_key, w.ch) or 'null'
      append_step(KEYS[5], id, resolution_line(w, h.a, child.s, out, now))
      return {C.RESOLVED, child.s, out}
    end
  end
elseif kind == 'event' then
  local consumed = {}
  for i = 12, #ARGV do consumed[ARGV[i]] = true end
  local prefix = ARGV[10]
  local from = prefix .. string.format('%013d', h.c)
  local members = redis.call('ZRANGEBYLEX', KEYS[12], '[' .. from, '[' .. prefix .. '\255')
  for _, member in ipairs(members) do
    local event_id = string.sub(member, #prefix + 15)
    if not consumed[event_id] then
      local data = redis.call('HGET', KEYS[13], event_id)
      if data then
        append_step(KEYS[5], id, resolution_line(w, h.a, 'event', data, now))
        return {C.RESOLVED, 'event', data}
      end
    end
  end
  w.m = ARGV[8]
  redis.call('ZADD', KEYS[7], 0, w.m)
end

local due = -1
if tonumber(ARGV[7]) > 0 then
  due = tonumber(ARGV[7])
elseif tonumber(ARGV[6]) >= 0 then
  due = now + tonumber(ARGV[6])
end
append_step(KEYS[5], id, '{"n":' .. cjson.encode(w.n) .. ',"q":' .. w.q .. ',"a":' .. h.a ..
  ',"t0":' .. now .. ',"s":"wait","k":"' .. kind .. '"' .. (due >= 0 and (',"u":' .. due) or '') ..
  (w.ch and (',"ch":' .. cjson.encode(w.ch)) or '') .. '}\n')
if ARGV[11] ~= '' then w.info = cjson.decode(ARGV[11]) end
redis.call('HSET', KEYS[6], id, cjson.encode(w))
h.o = nil
if due >= 0 then
  h.av = due
  local head = redis.call('ZRANGE', KEYS[8], 0, 0, 'WITHSCORES')
  redis.call('ZADD', KEYS[8], due, id)
  if not head[2] or due < tonumber(head[2]) then ring(KEYS[9]) end
else
  h.av = nil
end
set_status(KEYS[3], id, h, 'scheduled')
redis.call('HSET', KEYS[1], id, cjson.encode(h))
redis.call('HDEL', KEYS[2], id)
redis.call('SREM', KEYS[4], id)
release_held({runs = KEYS[1], index = KEYS[3], limits = KEYS[14], held = KEYS[15], ready = KEYS[16],
  bell = KEYS[9]}, h.q, h.w)
release_mutex({runs = KEYS[1], mutexes = KEYS[17], held = KEYS[15], ready = KEYS[16], bell = KEYS[9]}, id, h)
return {C.OK, due}
