-- Shared helpers, inlined by the loader where a script says `--!include common`.

-- Server time in milliseconds: every due time, lease and timestamp comes from here.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
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

-- Moves the run's status entries in the lexicographic index (members s:<status>:<id> and
-- ws:<len>:<wf>:<status>:<id>) from h.s to `status`, and sets h.s.
local function set_status(index_key, id, h, status)
  local wf = wf_tag(h)
  if h.s then
    redis.call('ZREM', index_key, 's:' .. h.s .. ':' .. id, 'ws:' .. wf .. ':' .. h.s .. ':' .. id)
  end
  redis.call('ZADD', index_key, 0, 's:' .. status .. ':' .. id, 0, 'ws:' .. wf .. ':' .. status .. ':' .. id)
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
  local h = cjson.decode(hraw)
  if h.s ~= 'scheduled' then return nil end
  resolve_wait(k.steps, id, w, h.a, resolution, raw, now)
  redis.call('HDEL', k.waits, id)
  if w.m then redis.call('ZREM', k.waiters, w.m) end
  redis.call('ZREM', k.sched, id)
  h.rc = 1
  h.av = now
  set_status(k.index, id, h, 'queued')
  redis.call('HSET', k.runs, id, cjson.encode(h))
  redis.call('RPUSH', k.ready, id)
  ring(k.bell)
  return w
end

local function canceled_error(id, h, reason)
  return cjson.encode({name = 'CanceledError', kind = 'canceled',
    message = reason ~= '' and reason or ('run ' .. id .. ' of workflow ' .. h.w .. ' was canceled')})
end

-- Runs of workflow `w` running now, counted from the index (no counter that could drift).
local function running_count(index_key, w)
  local p = 'ws:' .. tag(w) .. 'running:'
  return redis.call('ZLEXCOUNT', index_key, '[' .. p, '[' .. p .. '\255')
end
