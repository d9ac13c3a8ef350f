-- Shared helpers, inlined by the loader where a script says `--!include common`.

-- Server time in milliseconds: every due time, lease and timestamp comes from here.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Run headers (hash `runs`) are MessagePack maps with the short field names of
-- records.RunHeader: about two thirds of JSON's size, and a third of its cost to decode and encode.
local function decode_run(raw)
  return cmsgpack.unpack(raw)
end

local function encode_run(h)
  return cmsgpack.pack(h)
end

-- A length-prefixed member fragment, so one name never reads as a prefix of another.
local function tag(value)
  return string.len(value) .. ':' .. value .. ':'
end

local function wf_tag(h)
  return string.len(h.w) .. ':' .. h.w
end

-- The run id at the end of a member (run ids contain no ':').
local function id_of(member)
  return string.match(member, '([^:]+)$')
end

local function is_terminal(status)
  return status == 'succeeded' or status == 'failed' or status == 'canceled'
end

-- Moves run `id` from status h.s to `status` and sets h.s. Runs not running have two members in
-- the lexicographic index k.index, s:<status>:<id> and ws:<len>:<wf>:<status>:<id>; running runs
-- have none and are counted per workflow in hash k.running instead (they are listed from the
-- leases), so a claim and a finish each write two members, not four. Every change of status goes
-- through here (or claim's batched form of it), which keeps the count exact. With `later` (see
-- transitions.lua's new_later), a run leaving running has its decrement counted in later.running
-- and a run's new members are appended to later.index as ZADD arguments, both written at the end
-- of the call: only for a terminal status, whose members nothing later in the same call removes.
local function set_status(k, id, h, status, later)
  local wf = wf_tag(h)
  if h.s == 'running' and later then
    later.running[h.w] = (later.running[h.w] or 0) + 1
  elseif h.s == 'running' then
    if redis.call('HINCRBY', k.running, h.w, -1) <= 0 then redis.call('HDEL', k.running, h.w) end
  elseif h.s then
    redis.call('ZREM', k.index, 's:' .. h.s .. ':' .. id, 'ws:' .. wf .. ':' .. h.s .. ':' .. id)
  end
  if status == 'running' then
    redis.call('HINCRBY', k.running, h.w, 1)
  elseif later then
    local m, n = later.index, #later.index
    m[n + 1], m[n + 2] = 0, 's:' .. status .. ':' .. id
    m[n + 3], m[n + 4] = 0, 'ws:' .. wf .. ':' .. status .. ':' .. id
  else
    redis.call('ZADD', k.index, 0, 's:' .. status .. ':' .. id, 0, 'ws:' .. wf .. ':' .. status .. ':' .. id)
  end
  h.s = status
end

-- Calls fn on slices of `list` of at most `width` elements (unpack() is bounded by the Lua stack),
-- collecting what each call returns into one list.
local function each_slice(list, width, fn)
  local out = {}
  for start = 1, #list, width do
    local stop = math.min(#list, start + width - 1)
    local reply = fn(unpack(list, start, stop))
    if type(reply) == 'table' then
      for _, v in ipairs(reply) do out[#out + 1] = v end
    end
  end
  return out
end

-- Leaves one token in a queue's bell list, waking one worker blocked on it.
local function ring(bell_key)
  if redis.call('LLEN', bell_key) == 0 then
    redis.call('LPUSH', bell_key, '1')
  end
end

-- Adds `id` to a due-time zset, ringing the bell when it becomes the earliest entry.
local function schedule_at(sched_key, bell_key, id, due)
  local head = redis.call('ZRANGE', sched_key, 0, 0, 'WITHSCORES')
  redis.call('ZADD', sched_key, due, id)
  if not head[2] or due < tonumber(head[2]) then ring(bell_key) end
end

-- Step history, append-only: the steps hash holds <id> -> number of lines and <id>:<n> -> line n
-- (one JSON object ending in a newline). A wait's line is replaced in place by its resolution.
local function history_append(steps_key, id, line)
  local n = redis.call('HINCRBY', steps_key, id, 1)
  redis.call('HSET', steps_key, id .. ':' .. n, line)
  return n
end

-- The whole history of run `id`, lines in order, as one string.
local function history_read(steps_key, id)
  local n = tonumber(redis.call('HGET', steps_key, id) or '0')
  local parts = {}
  local i = 1
  while i <= n do
    local fields = {}
    for j = i, math.min(n, i + 999) do fields[#fields + 1] = id .. ':' .. j end
    for _, line in ipairs(redis.call('HMGET', steps_key, unpack(fields))) do
      if line then parts[#parts + 1] = line end
    end
    i = i + 1000
  end
  return table.concat(parts)
end

-- Deletes the history of run `id`.
local function history_delete(steps_key, id)
  local n = tonumber(redis.call('HGET', steps_key, id) or '0')
  local i = 1
  while i <= n do
    local fields = {}
    for j = i, math.min(n, i + 999) do fields[#fields + 1] = id .. ':' .. j end
    redis.call('HDEL', steps_key, unpack(fields))
    i = i + 1000
  end
  redis.call('HDEL', steps_key, id)
end

-- The history line that resolves a durable wait; `raw` is JSON inserted as the step's output
-- (user JSON is concatenated, never decoded here). The wait's details (`w.info`, JSON text) are
-- kept on it as a string, so a resolved wait still says what it waited for.
local function resolution_line(w, attempt, resolution, raw, now)
  return '{"n":' .. cjson.encode(w.n) .. ',"q":' .. w.q .. ',"a":' .. attempt .. ',"o":' .. raw ..
    (w.t0 and (',"t0":' .. w.t0) or '') .. ',"t1":' .. now .. ',"s":"done","k":"' .. w.k ..
    '","r":"' .. resolution .. '"' .. (w.u and (',"u":' .. w.u) or '') ..
    (w.ch and (',"ch":' .. cjson.encode(w.ch)) or '') .. (w.info and (',"i":' .. cjson.encode(w.info)) or '') ..
    '}\n'
end

-- Records how wait `w` of run `id` was resolved: over its wait line, or appended when it had none.
local function resolve_wait(steps_key, id, w, attempt, resolution, raw, now)
  local line = resolution_line(w, attempt, resolution, raw, now)
  if w.ln then
    redis.call('HSET', steps_key, id .. ':' .. w.ln, line)
  else
    history_append(steps_key, id, line)
  end
end

-- Ends the durable wait of run `id` (kind `kind`, child `child` when given): records the
-- resolution in its history and queues it again on its own attempt. `k` holds runs, index, waits,
-- waiters, steps and the ready, sched, bell keys of the run's queue. Returns the wait, or nil when
-- the run is not waiting that way (already resumed, canceled, or waiting on something else).
local function resume_waiter(k, id, kind, child, resolution, raw, now)
  local wraw = redis.call('HGET', k.waits, id)
  if not wraw then return nil end
  local w = cjson.decode(wraw)
  if w.k ~= kind or (child and w.ch ~= child) then return nil end
  local hraw = redis.call('HGET', k.runs, id)
  if not hraw then return nil end
  local h = decode_run(hraw)
  if h.s ~= 'scheduled' then return nil end
  resolve_wait(k.steps, id, w, h.a, resolution, raw, now)
  redis.call('HDEL', k.waits, id)
  if w.m then redis.call('ZREM', k.waiters, w.m) end
  redis.call('ZREM', k.sched, id)
  h.rc = 1
  h.av = now
  set_status(k, id, h, 'queued')
  redis.call('HSET', k.runs, id, encode_run(h))
  redis.call('RPUSH', k.ready, id)
  ring(k.bell)
  return w
end

-- The reply asking the caller for the queues in `missing` (nothing was written).
local function need_queues(missing)
  local out = {C.NEED_QUEUES}
  for _, q in ipairs(missing) do out[#out + 1] = q end
  return out
end

-- The runs waiting in `waiters_key` under member prefix `prefix` (an event name and correlation
-- key): {id, q} for each run that still exists; queues not in `queues` are added to `missing`.
local function event_waiters(runs_key, waiters_key, prefix, queues, missing)
  local waiting = {}
  for _, member in ipairs(redis.call('ZRANGEBYLEX', waiters_key, '[' .. prefix, '[' .. prefix .. '\255')) do
    local run_id = string.sub(member, #prefix + 1)
    local raw = redis.call('HGET', runs_key, run_id)
    if raw then
      local q = decode_run(raw).q
      waiting[#waiting + 1] = {id = run_id, q = q}
      if not queues[q] then missing[#missing + 1] = q end
    end
  end
  return waiting
end

-- Adds `member` to the event buffer and keeps the newest `bound` of its (event, key) `prefix`.
local function buffer_event(buffer_key, prefix, member, bound)
  redis.call('ZADD', buffer_key, 0, member)
  local all = redis.call('ZRANGEBYLEX', buffer_key, '[' .. prefix, '[' .. prefix .. '\255')
  for i = 1, #all - bound do redis.call('ZREM', buffer_key, all[i]) end
end

local function canceled_error(id, h, reason)
  return cjson.encode({name = 'CanceledError', kind = 'canceled',
    message = reason ~= '' and reason or ('run ' .. id .. ' of workflow ' .. h.w .. ' was canceled')})
end

-- Runs of workflow `w` running now (see set_status).
local function running_count(running_key, w)
  return tonumber(redis.call('HGET', running_key, w) or 0)
end
