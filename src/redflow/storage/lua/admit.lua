-- admit: decide whether a run handed out as 'admit' (a first start of a workflow with admission
-- limits, or a run an operator retried) starts now. Order: cancellation, max_concurrency, mutex,
-- rate limit (over budget: the run fails as rate_limited, its handler never runs), throttle.
-- Throttled runs wait in FIFO order per throttle key: only the head of the queue is scheduled (for
-- when its window opens); each admission hands the head to the next run, so admitting n runs
-- costs O(n) calls. Budgets are fixed windows that expire on their own; only a run that starts is charged.
-- KEYS[1] runs
-- KEYS[2] leases
-- KEYS[3] index
-- KEYS[4] owned        owned:<worker id>
-- KEYS[5] results
-- KEYS[6] errors
-- KEYS[7] expiry
-- KEYS[8] steps
-- KEYS[9] attempts
-- KEYS[10] waits
-- KEYS[11] waiters
-- KEYS[12] throttle_counter   tb:<n>:<wf>:<key> (a placeholder without throttle)
-- KEYS[13] rate_counter       rb:<n>:<wf>:<key> (a placeholder without rate limit)
-- KEYS[14] mutexes
-- KEYS[15] held
-- KEYS[16] seq
-- KEYS[17] limits
-- KEYS[18] running
-- KEYS[19] outbox
-- KEYS[20..] queues    ready, sched, bell of each queue named in ARGV[12]
-- ARGV[1] run id
-- ARGV[2] fencing token
-- ARGV[3] throttle limit (0 = none)
-- ARGV[4] throttle period in ms
-- ARGV[5] rate limit (0 = none)
-- ARGV[6] rate period in ms
-- ARGV[7] 1 when an on_failure hook must run after a rate-limit failure
-- ARGV[8] retention in ms
-- ARGV[9] done channel of the run
-- ARGV[10] mutex field <tag(key)>, shared by every workflow ('' = no mutex)
-- ARGV[11] throttle group <tag(wf)><tag(key)> ('' = no throttle)
-- ARGV[12] queues: the run's queue, and any other queue it may hand on to, one per line
-- RETURNS {C.OK, header (MessagePack)} (started: status running, its next attempt)
--       | {C.THROTTLED, due ms, or -1 behind other throttled runs} | {C.RATE_LIMITED, retry after ms}
--       | {C.HELD} (its mutex is taken, or the workflow is at max_concurrency) | {C.CANCELED}
--       | {C.STALE} | {C.WRONG_STATUS, status} | {C.NEED_QUEUES, queue, ...}
--!include common
--!include transitions

local id = ARGV[1]
if not holds_lease(id, ARGV[2]) then return {C.STALE} end
local h = load_run(id)
if not expect_status(h, 'queued') then return wrong_status(h) end
local now = now_ms()
local retention, channel = ARGV[8], ARGV[9]

if h.cr then
  local p, missing = plan(id, h, {ends = true})
  if #missing > 0 then return need_queues(missing) end
  end_run(id, h, 'canceled', canceled_error(id, h, h.cx or ''), p, now, {retention_ms = retention, channel = channel})
  return {C.CANCELED}
end

local limit = redis.call('HGET', K.limits, h.w)
if limit and running_count(K.running, h.w) >= tonumber(limit) then
  h.hd = held_add('c', h.w, id)
  disown(id, h)
  save_run(id, h)
  return {C.HELD}
end
if ARGV[10] ~= '' then
  h.mf = ARGV[10]
  if not mutex_free_for(id, h) then
    h.hd = held_add('m', h.mf, id)
    disown(id, h)
    save_run(id, h)
    return {C.HELD}
  end
end

local function over(counter, budget, period)
  local used = tonumber(redis.call('GET', counter) or '0')
  if used < budget then return nil end
  local left = redis.call('PTTL', counter)
  if left < 0 then left = tonumber(period) end
  return left
end

local rate_limit, throttle_limit = tonumber(ARGV[5]), tonumber(ARGV[3])
if rate_limit > 0 then
  local wait = over(K.rate_counter, rate_limit, ARGV[6])
  if wait then
    local p, missing = plan(id, h, {ends = true})
    if #missing > 0 then return need_queues(missing) end
    h.a, h.ad = h.a + 1, nil
    h.st = now
    local err = cjson.encode({name = 'RateLimitExceededError', kind = 'rate_limited', retryAfterMs = wait,
      message = 'run ' .. id .. ' of workflow ' .. h.w .. ' exceeded its rate limit of ' .. rate_limit ..
      ' per ' .. ARGV[6] .. ' ms; retry after ' .. wait .. ' ms'})
    end_run(id, h, 'failed', err, p, now, {retention_ms = retention, channel = channel, keep_owner = ARGV[7] == '1'})
    return {C.RATE_LIMITED, wait}
  end
end

-- A run queued under a throttle that has changed since (another key, or none) leaves that queue,
-- handing its head on as any run leaving it does.
local group = ARGV[11]
local old_next, old_damaged = nil, {}
if h.tq and h.tg ~= group then
  local q
  old_next, old_damaged, q = next_in_line(h.tg, h.tq)
  if q and not K.queues[q] then return need_queues({q}) end
  if #old_damaged > 0 and not K.queues[h.q] then return need_queues({h.q}) end
end
local function leave_old_queue()
  if h.tq and h.tg ~= group then
    redis.call('ZREM', K.held, h.tq)
    h.tq, h.tg = nil, nil
    for _, m in ipairs(old_damaged) do move_aside(m, h.q) end
    if old_next then wake_throttled(old_next) end
  end
end

local next_throttled, damaged_next = nil, {}
if throttle_limit > 0 then
  local mine = h.tg == group and h.tq or nil
  local two = held_first('t', group, 2)
  local ahead = two[1] and two[1] ~= mine
  local wait = nil
  if not ahead then wait = over(K.throttle_counter, throttle_limit, ARGV[4]) end
  if ahead or wait then
    if not K.queues[h.q] then return need_queues({h.q}) end
    leave_old_queue()
    if not h.tq then
      h.tq = held_add('t', group, id)
      h.tg = group
    end
    disown(id, h)
    -- Scheduled either way: the head until its window opens, the others until the head hands on.
    set_status(K, id, h, 'scheduled')
    if wait then
      h.av = now + wait
      schedule_at(K.queues[h.q].sched, K.queues[h.q].bell, id, h.av)
    else
      h.av = nil
    end
    save_run(id, h)
    return {C.THROTTLED, wait and h.av or -1}
  end
  if mine then
    local q
    next_throttled, damaged_next, q = next_in_line(group, mine)
    if q and not K.queues[q] then return need_queues({q}) end
    if #damaged_next > 0 and not K.queues[h.q] then return need_queues({h.q}) end
  end
end

for _, counter in ipairs({{K.rate_counter, rate_limit, ARGV[6]}, {K.throttle_counter, throttle_limit, ARGV[4]}}) do
  if counter[2] > 0 and redis.call('INCR', counter[1]) == 1 then
    redis.call('PEXPIRE', counter[1], counter[3])
  end
end
leave_old_queue()
if h.tq then
  redis.call('ZREM', K.held, h.tq)
  h.tq, h.tg = nil, nil
end
for _, m in ipairs(damaged_next) do move_aside(m, h.q) end
if next_throttled then wake_throttled(next_throttled) end
if h.mf then redis.call('HSET', K.mutexes, h.mf, id) end
h.a, h.ad = h.a + 1, nil
h.st = now
if not h.sa then h.sa = now end
set_status(K, id, h, 'running')
local encoded = encode_run(h)
redis.call('HSET', K.runs, id, encoded)
return {C.OK, encoded}
