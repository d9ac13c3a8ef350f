-- enqueue: create a run, queued now or scheduled for ARGV[6], unless it already exists.
-- A retried call with the same run id, or an idempotency key bound to a live or succeeded run,
-- returns the existing run and writes nothing new.
-- KEYS[1] runs
-- KEYS[2] inputs
-- KEYS[3] index
-- KEYS[4] ready        q:<queue>:ready
-- KEYS[5] scheduled    q:<queue>:sched
-- KEYS[6] bell         q:<queue>:bell
-- KEYS[7] children
-- KEYS[8] idempotency  idem:<wf>:<key> (present only when ARGV[7] > 0)
-- ARGV[1] run id
-- ARGV[2] workflow name
-- ARGV[3] queue name
-- ARGV[4] input JSON
-- ARGV[5] max attempts
-- ARGV[6] run_at, epoch ms (0 = now)
-- ARGV[7] idempotency TTL in seconds (0 = no idempotency key)
-- ARGV[8] parent run id ('' = none)
-- ARGV[9] trace context of the caller ('' = none)
-- ARGV[10] the idempotency key itself (kept in the header, so a retried run can bind it again)
-- RETURNS {C.CREATED, run id, status} | {C.EXISTING, run id, status}
--       | {C.CANCELED} (the parent was canceled: no child is created)
--!include common
--!include runs

local id = ARGV[1]
local k = {runs = KEYS[1], inputs = KEYS[2], index = KEYS[3], ready = KEYS[4], sched = KEYS[5],
  bell = KEYS[6], children = KEYS[7]}
if ARGV[8] == '' and tonumber(ARGV[7]) == 0 then
  -- No parent, no idempotency key: creating the run if it is absent is the whole check.
  local h = create_run(k, id, ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), '', '', now_ms(),
    ARGV[9], true)
  if h then return {C.CREATED, id, h.s} end
  return {C.EXISTING, id, decode_run(redis.call('HGET', KEYS[1], id)).s}
end

local existing = redis.call('HGET', KEYS[1], id)
if existing then
  return {C.EXISTING, id, decode_run(existing).s}
end

if parent_canceled(KEYS[1], ARGV[8]) then return {C.CANCELED} end

local ttl = tonumber(ARGV[7])
if ttl > 0 then
  local bound = redis.call('GET', KEYS[8])
  if bound then
    local raw = redis.call('HGET', KEYS[1], bound)
    if raw then
      local s = decode_run(raw).s
      if s ~= 'failed' and s ~= 'canceled' then
        return {C.EXISTING, bound, s}
      end
    end
  end
  redis.call('SET', KEYS[8], id, 'EX', ttl)
end

local h = create_run(k, id, ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[8],
  '', now_ms(), ARGV[9])
if ttl > 0 then
  h.ik = ARGV[10]
  redis.call('HSET', KEYS[1], id, encode_run(h))
end
return {C.CREATED, id, h.s}
