-- Creating runs, shared by enqueue and event fan-out. Needs common.lua.

-- Creates run `id` (it must not exist) queued now or scheduled at run_at; `k` holds the keys
-- runs, inputs, index, ready, sched, bell of its queue, and children. Returns the header.
-- (`parent_queue` is unused: a parent that waits registers itself with the child.) `tc` is the
-- trace context of the code that started it ('' or nil: none).
local function create_run(k, id, workflow, queue, input, max_attempts, run_at, parent, parent_queue, now, tc)
  local h = {w = workflow, q = queue, a = 0, m = max_attempts, c = now}
  if tc and tc ~= '' then h.tc = tc end
  if parent and parent ~= '' then
    h.p = parent
    redis.call('ZADD', k.children, 0, parent .. ':' .. id)
  end
  local status = run_at > now and 'scheduled' or 'queued'
  local wf = wf_tag(h)
  redis.call('ZADD', k.index, 0, 's:' .. status .. ':' .. id, 0, 'ws:' .. wf .. ':' .. status .. ':' .. id)
  h.s = status
  if run_at > now then
    h.av = run_at
    local head = redis.call('ZRANGE', k.sched, 0, 0, 'WITHSCORES')
    redis.call('ZADD', k.sched, run_at, id)
    if not head[2] or run_at < tonumber(head[2]) then ring(k.bell) end
  else
    h.av = now
    redis.call('LPUSH', k.ready, id)
    ring(k.bell)
  end
  redis.call('HSET', k.runs, id, encode_run(h))
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
