-- enqueue: create a run, queued now or scheduled for ARGV[6], unless it already exists.
-- A retried call with the same run id, or an idempotency key bound to a live or succeeded run,
-- returns the existing run and writes nothing new.
-- KEYS[1] runs
-- KEYS[2] inputs
-- KEYS[3] index
-- KEYS[4] ready        q:<queue>:ready
-- KEYS[5] scheduled    q:<queue>:sched
-- KEYS[6] bell         q:<queue>:bell
-- KEYS[7] idempotency  idem:<wf>:<key> (present only when ARGV[7] > 0)
-- ARGV[1] run id
-- ARGV[2] workflow name
-- ARGV[3] queue name
-- ARGV[4] input JSON
-- ARGV[5] max attempts
-- ARGV[6] run_at, epoch ms (0 = now)
-- ARGV[7] idempotency TTL in seconds (0 = no idempotency key)
-- ARGV[8] parent run id ('' = none)
-- RETURNS {C.CREATED, run id, status} | {C.EXISTING, run id, status}
--!include common

local id = ARGV[1]
local existing = redis.call('HGET', KEYS[1], id)
if existing then
  return {C.EXISTING, id, cjson.decode(existing).s}
end

local ttl = tonumber(ARGV[7])
if ttl > 0 then
  local bound = redis.call('GET', KEYS[7])
  if bound then
    local raw = redis.call('HGET', KEYS[1], bound)
    if raw then
      local s = cjson.decode(raw).s
      if s ~= 'failed' and s ~= 'canceled' then
        return {C.EXISTING, bound, s}
      end
    end
  end
  redis.call('SET', KEYS[7], id, 'EX', ttl)
end

local now = now_ms()
local run_at = tonumber(ARGV[6])
local h = {w = ARGV[2], q = ARGV[3], a = 0, m = tonumber(ARGV[5]), c = now}
if ARGV[8] ~= '' then h.p = ARGV[8] end
redis.call('ZADD', KEYS[3], 0, 'w:' .. wf_tag(h) .. ':' .. id)
if run_at > now then
  h.av = run_at
  set_status(KEYS[3], id, h, 'scheduled')
  local head = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
  redis.call('ZADD', KEYS[5], run_at, id)
  if not head[2] or run_at < tonumber(head[2]) then ring(KEYS[6]) end
else
  h.av = now
  set_status(KEYS[3], id, h, 'queued')
  redis.call('LPUSH', KEYS[4], id)
  ring(KEYS[6])
end
redis.call('HSET', KEYS[1], id, cjson.encode(h))
redis.call('HSET', KEYS[2], id, ARGV[4])
return {C.CREATED, id, h.s}
