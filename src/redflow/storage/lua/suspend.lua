-- suspend: a running run starts a durable wait (sleep, event, child or input) and leaves its worker
-- until the wait is resolved: by its deadline (claim promotes it), an event (emit), the child's end
-- (end_run of the child resumes every parent waiting for it) or input (resume_input). A wait that
-- can be satisfied at once is resolved here instead. A clean suspend ends the attempt's run of
-- worker lapses: only consecutive lapses count towards a crash.
-- KEYS[1] runs
-- KEYS[2] leases
-- KEYS[3] index
-- KEYS[4] owned        owned:<worker id>
-- KEYS[5] steps
-- KEYS[6] waits
-- KEYS[7] waiters
-- KEYS[8] results
-- KEYS[9] errors
-- KEYS[10] event_buffer
-- KEYS[11] event_data
-- KEYS[12] limits
-- KEYS[13] held
-- KEYS[14] mutexes
-- KEYS[15] running
-- KEYS[16] child_ends
-- KEYS[17..] queues    ready, sched, bell of each queue named in ARGV[12]
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
-- ARGV[11] details of the wait as JSON ({msg, schema} for input, {event, key} for event, {timeout_ms}
--          for a sleep cut short by its timeout), '' for none;
--          kept as a string in the wait record and on the wait's history lines
-- ARGV[12] queues: the run's queue, and any other queue it may hand on to, one per line
-- ARGV[13..] ids of events earlier wait steps of this run consumed
-- RETURNS {C.OK, deadline ms or -1} | {C.RESOLVED, resolution, output JSON} | {C.STALE}
--       | {C.CANCELED} | {C.WRONG_STATUS, status} | {C.NEED_QUEUES, queue, ...}
--!include common
--!include transitions

local id = ARGV[1]
if not holds_lease(id, ARGV[2]) then return {C.STALE} end
local h = load_run(id)
if not expect_status(h, 'running') then return wrong_status(h) end
if h.cr then return {C.CANCELED} end
local now = now_ms()
local kind = ARGV[5]
local w = {n = ARGV[3], q = tonumber(ARGV[4]), k = kind, t0 = now}
if ARGV[11] ~= '' then w.info = ARGV[11] end

if kind == 'child' then
  w.ch = ARGV[9]
  local child = load_run(w.ch)
  if child and is_terminal(child.s) then
    local outcome_key = child.s == 'succeeded' and K.results or K.errors
    local out = redis.call('HGET', outcome_key, w.ch) or 'null'
    resolve_wait(K.steps, id, w, h.a, child.s, out, now)
    return {C.RESOLVED, child.s, out}
  end
  -- A child in another partition that already ended has left its outcome here (child_ended).
  local ended = not child and redis.call('HGET', K.child_ends, w.ch)
  if ended then
    local status, out = string.match(ended, '^(%a+)\n(.*)$')
    resolve_wait(K.steps, id, w, h.a, status, out, now)
    return {C.RESOLVED, status, out}
  end
elseif kind == 'event' then
  local consumed = {}
  for i = 13, #ARGV do consumed[ARGV[i]] = true end
  local prefix = ARGV[10]
  local from = prefix .. string.format('%013d', h.c)
  local members = redis.call('ZRANGEBYLEX', K.event_buffer, '[' .. from, '[' .. prefix .. '\255')
  for _, member in ipairs(members) do
    local event_id = string.sub(member, #prefix + 15)
    if not consumed[event_id] then
      local data = redis.call('HGET', K.event_data, event_id)
      if data then
        resolve_wait(K.steps, id, w, h.a, 'event', data, now)
        return {C.RESOLVED, 'event', data}
      end
    end
  end
end

local p, missing = plan(id, h, {running = true})
if #missing > 0 then return need_queues(missing) end
if kind == 'event' then
  w.m = ARGV[8]
  redis.call('ZADD', K.waiters, 0, w.m)
elseif kind == 'child' then
  w.m = 'c:' .. w.ch .. ':' .. id  -- the child's end_run finds its waiting parents here
  redis.call('ZADD', K.waiters, 0, w.m)
end
local due = -1
if tonumber(ARGV[7]) > 0 then
  due = tonumber(ARGV[7])
elseif tonumber(ARGV[6]) >= 0 then
  due = now + tonumber(ARGV[6])
end
if due >= 0 then w.u = due end
w.ln = history_append(K.steps, id, '{"n":' .. cjson.encode(w.n) .. ',"q":' .. w.q .. ',"a":' .. h.a ..
  ',"t0":' .. now .. ',"s":"wait","k":"' .. kind .. '"' .. (due >= 0 and (',"u":' .. due) or '') ..
  (w.ch and (',"ch":' .. cjson.encode(w.ch)) or '') .. (w.info and (',"i":' .. cjson.encode(w.info)) or '') .. '}\n')
redis.call('HSET', K.waits, id, cjson.encode(w))
h.x = nil
if due >= 0 then
  h.av = due
  schedule_at(K.queues[h.q].sched, K.queues[h.q].bell, id, due)
else
  h.av = nil
end
set_status(K, id, h, 'scheduled')
stop_running(id, h, p)
save_run(id, h)
return {C.OK, due}
