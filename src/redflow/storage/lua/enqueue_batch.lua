-- enqueue_batch: create many runs of one workflow in one call, queued now or all scheduled for
-- ARGV[5]. Ids are fresh (made by the client for this call); an id that exists already is skipped,
-- so retrying a batch is safe, and an id listed twice is created once. No idempotency keys: use
-- enqueue for those.
-- KEYS[1] runs
-- KEYS[2] inputs
-- KEYS[3] index
-- KEYS[4] ready        q:<queue>:ready
-- KEYS[5] scheduled    q:<queue>:sched
-- KEYS[6] bell         q:<queue>:bell
-- ARGV[1] workflow name
-- ARGV[2] queue name
-- ARGV[3] max attempts
-- ARGV[4] number of runs n
-- ARGV[5] run_at, epoch ms (0 = now)
-- ARGV[6..] n run ids, then their n input JSON documents
-- RETURNS {C.CREATED, runs created}
--!include common

local now = now_ms()
local n = tonumber(ARGV[4])
local run_at = tonumber(ARGV[5])
local status = run_at > now and 'scheduled' or 'queued'
local h = {w = ARGV[1], q = ARGV[2], a = 0, m = tonumber(ARGV[3]), c = now, s = status,
  av = run_at > now and run_at or now}
local header = encode_run(h)
local wf = wf_tag(h)
local members, records, inputs, ids = {}, {}, {}, {}
-- One HMGET per slice of ids, not one HEXISTS per id: which of them exist already.
local asked = {}
for i = 1, n do asked[i] = ARGV[5 + i] end
local existing = each_slice(asked, 1000, function(...) return redis.call('HMGET', KEYS[1], ...) end)
local taken = {}  -- an id listed twice in the call is created once, with its first input
for i = 1, n do
  local id = ARGV[5 + i]
  if not existing[i] and not taken[id] then
    taken[id] = true
    members[#members + 1] = 0
    members[#members + 1] = 's:' .. status .. ':' .. id
    members[#members + 1] = 0
    members[#members + 1] = 'ws:' .. wf .. ':' .. status .. ':' .. id
    records[#records + 1] = id
    records[#records + 1] = header
    inputs[#inputs + 1] = id
    inputs[#inputs + 1] = ARGV[5 + n + i]
    ids[#ids + 1] = id
  end
end
local created = #ids
if created > 0 then
  each_slice(members, 1500, function(...) redis.call('ZADD', KEYS[3], ...) end)
  each_slice(records, 1000, function(...) redis.call('HSET', KEYS[1], ...) end)
  each_slice(inputs, 1000, function(...) redis.call('HSET', KEYS[2], ...) end)
  if status == 'queued' then
    each_slice(ids, 500, function(...) redis.call('LPUSH', KEYS[4], ...) end)
  else
    local scored = {}
    for _, id in ipairs(ids) do
      scored[#scored + 1] = run_at
      scored[#scored + 1] = id
    end
    each_slice(scored, 1000, function(...) redis.call('ZADD', KEYS[5], ...) end)
  end
  ring(KEYS[6])
end
return {C.CREATED, created}
