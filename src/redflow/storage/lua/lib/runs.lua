-- Creating runs, shared by enqueue and event fan-out. Needs common.lua.

-- Creates run `id` queued now or scheduled at run_at; `k` holds the keys runs, inputs, index,
-- ready, sched, bell of its queue, and children. Returns the header. The run must not exist, or,
-- with `nx`, may: then nothing is written and nil is returned (one HSETNX both checks and writes).
-- (`parent_queue` is unused: a parent that waits registers itself with the child.) `tc` is the
-- trace context of the code that started it ('' or nil: none).
local function create_run(k, id, workflow, queue, input, max_attempts, run_at, parent, parent_queue, now, tc, nx)
  local h = {w = workflow, q = queue, a = 0, m = max_attempts, c = now}
  if tc and tc ~= '' then h.tc = tc end
  if parent and parent ~= '' then h.p = parent end
  local status = run_at > now and 'scheduled' or 'queued'
  h.s = status
  h.av = run_at > now and run_at or now
  if nx then
    if redis.call('HSETNX', k.runs, id, encode_run(h)) == 0 then return nil end
  else
    redis.call('HSET', k.runs, id, encode_run(h))
  end
  if h.p then redis.call('ZADD', k.children, 0, parent .. ':' .. id) end
  local wf = wf_tag(h)
  redis.call('ZADD', k.index, 0, 's:' .. status .. ':' .. id, 0, 'ws:' .. wf .. ':' .. status .. ':' .. id)
  if run_at > now then
    local head = redis.call('ZRANGE', k.sched, 0, 0, 'WITHSCORES')
    redis.call('ZADD', k.sched, run_at, id)
    if not head[2] or run_at < tonumber(head[2]) then ring(k.bell) end
  else
    redis.call('LPUSH', k.ready, id)
    ring(k.bell)
  end
  redis.call('HSET', k.inputs, id, input)
  return h
end

-- True when run `parent` may not start children any more (it was canceled, or its cancellation
-- was requested): a child started concurrently with the cancel is refused rather than orphaned.
local function parent_canceled(runs_key, parent)
  if not parent or parent == '' then return false end
  local raw = redis.call('HGET', runs_key, parent)
  if not raw then return false end
  local h = decode_run(raw)
  return h.cr ~= nil or h.s == 'canceled'
end
