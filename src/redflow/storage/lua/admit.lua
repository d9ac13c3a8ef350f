-- admit: decide whether a run handed out as 'admit' starts now. Order: rate limit (over budget: the
-- run fails as rate_limited, its handler never runs), then throttle (over budget: the run is
-- scheduled for when the window opens). Budgets are fixed windows that expire on their own; only
-- a run that starts is charged, and a run resumed later is never charged again.
-- KEYS[1] runs
-- KEYS[2] leases
-- KEYS[3] index
-- KEYS[4] owned        owned:<worker id>
-- KEYS[5] scheduled    q:<queue>:sched
-- KEYS[6] bell         q:<queue>:bell
-- KEYS[7] errors
-- KEYS[8] expiry
-- KEYS[9] steps
-- KEYS[10] throttle counter   tb:<wf>:<key> (a placeholder without throttle)
-- KEYS[11] rate counter       rb:<wf>:<key> (a placeholder without rate limit)
-- KEYS[12] mutexes
-- KEYS[13] held
-- KEYS[14] seq
-- KEYS[15] ready        q:<queue>:ready
-- KEYS[16] limits
-- ARGV[1] run id
-- ARGV[2] fencing token
-- ARGV[3] throttle limit (0 = none)
-- ARGV[4] throttle period in ms
-- ARGV[5] rate limit (0 = none)
-- ARGV[6] rate period in ms
-- ARGV[7] 1 when an on_failure hook must run after a rate-limit failure
-- ARGV[8] retention in ms
-- ARGV[9] done channel of the run
-- ARGV[10] mutex field <tag(wf)><key> ('' = no mutex)
-- RETURNS {C.OK, header JSON} (started: status running, attempt 1)
--       | {C.RETRY, due ms} (throttled: scheduled) | {C.TERMINAL, retry after ms} (rate limited: failed)
--       | {C.EXISTING} (held: its mutex is taken, or the workflow is at max_concurrency) | {C.STALE}
--!include common

local id = ARGV[1]
if redis.call('HGET', KEYS[2], id) ~= ARGV[2] then return {C.STALE} end
local h = cjson.decode(redis.call('HGET', KEYS[1], id))
local now = now_ms()

local limit = redis.call('HGET', KEYS[16], h.w)
if limit and running_count(KEYS[3], h.w) >= tonumber(limit) then
  hold({runs = KEYS[1], held = KEYS[13], seq = KEYS[14]}, id, h)
  h.o = nil
  redis.call('HSET', KEYS[1], id, cjson.encode(h))
  redis.call('HDEL', KEYS[2], id)
  redis.call('SREM', KEYS[4], id)
  return {C.EXISTING}
end

if ARGV[10] ~= '' then
  h.mf = ARGV[10]
  local adm = {runs = KEYS[1], mutexes = KEYS[12], held = KEYS[13], seq = KEYS[14]}
  if not take_mutex(adm, id, h) then
    hold_for_mutex(adm, id, h)
    h.o = nil
    redis.call('HSET', KEYS[1], id, cjson.encode(h))
    redis.call('HDEL', KEYS[2], id)
    redis.call('SREM', KEYS[4], id)
    return {C.EXISTING}
  end
end

local function over(counter, limit, period)
  local used = tonumber(redis.call('GET', counter) or '0')
  if used < limit then return nil end
  local left = redis.call('PTTL', counter)
  if left < 0 then left = period end
  return left
end

local rate_limit, throttle_limit = tonumber(ARGV[5]), tonumber(ARGV[3])
if rate_limit > 0 then
  local wait = over(KEYS[11], rate_limit, tonumber(ARGV[6]))
  if wait then
    h.a = 1
    h.f = now
    set_status(KEYS[3], id, h, 'failed')
    local err = cjson.encode({name = 'RateLimitExceededError', kind = 'rate_limited', retryAfterMs = wait,
      message = 'run ' .. id .. ' of workflow ' .. h.w .. ' exceeded its rate limit of ' .. rate_limit ..
      ' per ' .. ARGV[6] .. ' ms; retry after ' .. wait .. ' ms'})
    redis.call('HSET', KEYS[7], id, err)
    attempt_line(KEYS[9], id, h, 'failed', err, now)
    redis.call('ZADD', KEYS[8], now + tonumber(ARGV[8]), id)
    if ARGV[7] == '1' then
      h.h = 1
    else
      h.o = nil
      redis.call('HDEL', KEYS[2], id)
      redis.call('SREM', KEYS[4], id)
    end
    redis.call('HSET', KEYS[1], id, cjson.encode(h))
    redis.call('PUBLISH', ARGV[9], 'failed')
    release_mutex({runs = KEYS[1], mutexes = KEYS[12], held = KEYS[13], ready = KEYS[15], bell = KEYS[6]}, id, h)
    return {C.TERMINAL, wait}
  end
end
if throttle_limit > 0 then
  local wait = over(KEYS[10], throttle_limit, tonumber(ARGV[4]))
  if wait then
    local due = now + wait
    h.av = due
    h.o = nil
    set_status(KEYS[3], id, h, 'scheduled')
    redis.call('HSET', KEYS[1], id, cjson.encode(h))
    redis.call('HDEL', KEYS[2], id)
    redis.call('SREM', KEYS[4], id)
    local head = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
    redis.call('ZADD', KEYS[5], due, id)
    if not head[2] or due < tonumber(head[2]) then ring(KEYS[6]) end
    release_mutex({runs = KEYS[1], mutexes = KEYS[12], held = KEYS[13], ready = KEYS[15], bell = KEYS[6]}, id, h)
    return {C.RETRY, due}
  end
end
for _, counter in ipairs({{KEYS[11], rate_limit, ARGV[6]}, {KEYS[10], throttle_limit, ARGV[4]}}) do
  if counter[2] > 0 and redis.call('INCR', counter[1]) == 1 then
    redis.call('PEXPIRE', counter[1], counter[3])
  end
end
h.a = 1
h.st = now
h.sa = now
set_status(KEYS[3], id, h, 'running')
local encoded = cjson.encode(h)
redis.call('HSET', KEYS[1], id, encoded)
return {C.OK, encoded}
