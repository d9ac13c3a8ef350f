-- Shared helpers, inlined by the loader where a script says `--!include common`.

-- Server time in milliseconds: every due time, lease and timestamp comes from here.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function wf_tag(h)
  return string.len(h.w) .. ':' .. h.w
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

-- Leaves one token in a queue's bell list, waking one worker blocked on it.
local function ring(bell_key)
  if redis.call('LLEN', bell_key) == 0 then
    redis.call('LPUSH', bell_key, '1')
  end
end

local function append_step(steps_key, id, line)
  local history = redis.call('HGET', steps_key, id)
  if history then
    redis.call('HSET', steps_key, id, history .. line)
  else
    redis.call('HSET', steps_key, id, line)
  end
end

-- The history line that resolves a durable wait; `raw` is JSON inserted as the step's output.
local function resolution_line(w, attempt, resolution, raw, now)
  return '{"n":' .. cjson.encode(w.n) .. ',"q":' .. w.q .. ',"a":' .. attempt .. ',"o":' .. raw ..
    ',"t1":' .. now .. ',"s":"done","k":"' .. w.k .. '","r":"' .. resolution .. '"' ..
    (w.ch and (',"ch":' .. cjson.encode(w.ch)) or '') .. '}\n'
end

-- Ends the durable wait of run `id` (kind `kind`, child `child` when given): records the
-- resolution in its history and queues it again on its own attempt. Returns the wait, or nil when
-- the run is not waiting that way (already resumed, canceled, or waiting on something else).
local function resume_waiter(k, id, kind, child, resolution, raw, now)
  local wraw = redis.call('HGET', k.waits, id)
  if not wraw then return nil end
  local w = cjson.decode(wraw)
  if w.k ~= kind or (child and w.ch ~= child) then return nil end
  local h = cjson.decode(redis.call('HGET', k.runs, id))
  append_step(k.steps, id, resolution_line(w, h.a, resolution, raw, now))
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

-- Drops the pending wait of a run that ends without resuming (canceled while waiting).
local function drop_wait(waits_key, waiters_key, id)
  local wraw = redis.call('HGET', waits_key, id)
  if wraw then
    local w = cjson.decode(wraw)
    if w.m then redis.call('ZREM', waiters_key, w.m) end
    redis.call('HDEL', waits_key, id)
  end
end

local function canceled_error(id, h, reason)
  return cjson.encode({name = 'CanceledError', kind = 'canceled',
    message = reason ~= '' and reason or ('run ' .. id .. ' of workflow ' .. h.w .. ' was canceled')})
end

local function tag(value)
  return string.len(value) .. ':' .. value .. ':'
end

-- Runs of workflow `w` running now, counted from the index (no counter that could drift).
local function running_count(index_key, w)
  local p = 'ws:' .. tag(w) .. 'running:'
  return redis.call('ZLEXCOUNT', index_key, '[' .. p, '[' .. p .. '\255')
end

-- Holds a queued run of a workflow at its max_concurrency: it waits, in FIFO order per (queue,
-- workflow), outside the ready list, so it never blocks runs of other workflows.
local function hold(k, id, h)
  local member = tag(h.q) .. tag(h.w) .. string.format('%013d', redis.call('INCR', k.seq)) .. ':' .. id
  redis.call('ZADD', k.held, 0, member)
  h.hd = member
end

-- Moves held runs of workflow `w` on `queue` back to the claim end of the ready list while the
-- workflow has capacity. `k` holds runs, index, limits, held, ready, bell.
local function release_held(k, queue, w)
  local limit = redis.call('HGET', k.limits, w)
  local free = 1000  -- no limit any more: release what was held under the old one, in batches
  if limit then free = tonumber(limit) - running_count(k.index, w) end
  if free <= 0 then return end
  local p = tag(queue) .. tag(w)
  local members = redis.call('ZRANGEBYLEX', k.held, '[' .. p, '[' .. p .. '\255', 'LIMIT', 0, free)
  for _, member in ipairs(members) do
    redis.call('ZREM', k.held, member)
    local id = string.sub(member, #p + 15)
    local raw = redis.call('HGET', k.runs, id)
    if raw then
      local held = cjson.decode(raw)
      held.hd = nil
      redis.call('HSET', k.runs, id, cjson.encode(held))
      redis.call('RPUSH', k.ready, id)
    end
  end
  if #members > 0 then ring(k.bell) end
end

-- Appends the end of an attempt to the run's history (kind 'attempt'; never replayed as a step).
local function attempt_line(steps_key, id, h, status, payload, now)
  append_step(steps_key, id, '{"n":"","q":0,"a":' .. h.a .. ',"o":' .. payload .. ',"t0":' .. (h.st or now) ..
    ',"t1":' .. now .. ',"s":"done","k":"attempt","r":"' .. status .. '"}\n')
end

-- Mutexes: hash `mutexes` maps <tag(wf)><key> (h.mf) to the run holding it, only while it runs.
-- Returns true when run `id` holds (or just took) its mutex, false when another run holds it.
local function take_mutex(k, id, h)
  if not h.mf then return true end
  local holder = redis.call('HGET', k.mutexes, h.mf)
  if holder and holder ~= id then return false end
  redis.call('HSET', k.mutexes, h.mf, id)
  return true
end

local function hold_for_mutex(k, id, h)
  local member = 'm:' .. tag(h.q) .. tag(h.mf) .. string.format('%013d', redis.call('INCR', k.seq)) .. ':' .. id
  redis.call('ZADD', k.held, 0, member)
  h.hd = member
end

-- Frees run `id`'s mutex when it stops running and hands the next waiter on its queue to the ready
-- list. `k` holds runs, mutexes, held, ready, bell.
local function release_mutex(k, id, h)
  if not h.mf or redis.call('HGET', k.mutexes, h.mf) ~= id then return end
  redis.call('HDEL', k.mutexes, h.mf)
  local p = 'm:' .. tag(h.q) .. tag(h.mf)
  local next_one = redis.call('ZRANGEBYLEX', k.held, '[' .. p, '[' .. p .. '\255', 'LIMIT', 0, 1)
  if next_one[1] then
    redis.call('ZREM', k.held, next_one[1])
    local waiter_id = string.sub(next_one[1], #p + 15)
    local raw = redis.call('HGET', k.runs, waiter_id)
    if raw then
      local waiter = cjson.decode(raw)
      waiter.hd = nil
      redis.call('HSET', k.runs, waiter_id, cjson.encode(waiter))
      redis.call('RPUSH', k.ready, waiter_id)
      ring(k.bell)
    end
  end
end
