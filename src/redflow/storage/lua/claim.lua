-- claim: promote due scheduled runs, then hand up to ARGV[2] runs of the worker's queues to
-- worker ARGV[1], each under a new fencing token. A run whose workflow is at its max_concurrency is
-- held aside (not claimed, not blocking the queue) and released when a run of it stops running. A
-- first start of a workflow with throttle or rate limit is handed out as kind 'admit' (still queued):
-- the worker computes its admission keys from the input and calls admit.lua. A due run that was waiting durably has its wait
-- resolved as 'timeout' (the end of a sleep, or a wait's deadline) and resumes on its own attempt. A queued run starts a new attempt unless it was
-- handed back or recovered (h.rc); a failed run with a pending hook (h.h) is claimed to run on_failure.
-- KEYS[1] runs
-- KEYS[2] inputs
-- KEYS[3] steps
-- KEYS[4] errors
-- KEYS[5] leases
-- KEYS[6] index
-- KEYS[7] workers
-- KEYS[8] seq
-- KEYS[9] owned        owned:<worker id>
-- KEYS[10] waits
-- KEYS[11] waiters
-- KEYS[12] limits
-- KEYS[13] held
-- KEYS[14] admission
-- KEYS[15] mutexes
-- KEYS[16..] ready, scheduled, bell of each queue, in that order (3 keys per queue)
-- ARGV[4..] the queue names, in the order of the KEYS triples
-- ARGV[1] worker id
-- ARGV[2] max runs to claim
-- ARGV[3] max scheduled runs to promote per queue
-- RETURNS {C.STALE_WORKER} when the worker's liveness lease lapsed
--       | {C.OK, ms until the next scheduled run (-1: none), then 7 fields per run:
--          id, kind ('run'|'hook'|'admit'), token, header JSON, input JSON, steps ('' for a first
--          attempt that never ran), error JSON (hooks only, else '')}
--!include common

local now = now_ms()
local alive = redis.call('ZSCORE', KEYS[7], ARGV[1])
if not alive or tonumber(alive) < now then
  return {C.STALE_WORKER}
end

local want = tonumber(ARGV[2])
-- Per-call caches and batched writes: one token counter bump, one HSET of leases, one SADD.
local token_base = nil
local leases, owned = {}, {}
local limits_cache, admission_cache = {}, {}
local function limit_of(w)
  if limits_cache[w] == nil then limits_cache[w] = redis.call('HGET', KEYS[12], w) or false end
  return limits_cache[w]
end
local function needs_admission(w)
  if admission_cache[w] == nil then admission_cache[w] = redis.call('HEXISTS', KEYS[14], w) == 1 end
  return admission_cache[w]
end
local promote = tonumber(ARGV[3])
local out = {C.OK, -1}
local next_due = nil
local got = 0

for k = 16, #KEYS, 3 do
  local ready, sched, bell = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  local queue = ARGV[4 + (k - 16) / 3]
  local adm = {runs = KEYS[1], index = KEYS[6], limits = KEYS[12], held = KEYS[13], seq = KEYS[8],
    ready = ready, bell = bell, mutexes = KEYS[15]}
  if redis.call('ZCARD', KEYS[13]) > 0 then
    -- Capacity may have freed elsewhere (another queue, a changed limit): re-check held runs here.
    local p = tag(queue)
    local seen = {}
    for _, member in ipairs(redis.call('ZRANGEBYLEX', KEYS[13], '[' .. p, '[' .. p .. '\255', 'LIMIT', 0, 20)) do
      local rest = string.sub(member, #p + 1)
      local colon = string.find(rest, ':', 1, true)
      local wlen = tonumber(string.sub(rest, 1, colon - 1))
      local w = string.sub(rest, colon + 1, colon + wlen)
      if not seen[w] then
        seen[w] = true
        release_held(adm, queue, w)
      end
    end
  end
  local due = redis.call('ZRANGEBYSCORE', sched, '-inf', now, 'LIMIT', 0, promote)
  for _, id in ipairs(due) do
    redis.call('ZREM', sched, id)
    local raw = redis.call('HGET', KEYS[1], id)
    if raw then
      local h = cjson.decode(raw)
      if h.s == 'scheduled' then
        local wraw = redis.call('HGET', KEYS[10], id)
        if wraw then
          local w = cjson.decode(wraw)
          append_step(KEYS[3], id, resolution_line(w, h.a, 'timeout', 'null', now))
          if w.m then redis.call('ZREM', KEYS[11], w.m) end
          redis.call('HDEL', KEYS[10], id)
          h.rc = 1
        end
        set_status(KEYS[6], id, h, 'queued')
        redis.call('HSET', KEYS[1], id, cjson.encode(h))
        redis.call('RPUSH', ready, id)
      end
    end
  end
  while got < want do
    local id = redis.call('RPOP', ready)
    if not id then break end
    local raw = redis.call('HGET', KEYS[1], id)
    if raw then
      local h = cjson.decode(raw)
      local kind = nil
      local fresh = false
      local limit = false
      if h.s == 'queued' and not h.hd then limit = limit_of(h.w) end
      if limit and running_count(KEYS[6], h.w) >= tonumber(limit) then
        hold(adm, id, h)
        redis.call('HSET', KEYS[1], id, cjson.encode(h))
      elseif h.s == 'queued' and not h.hd and h.mf and not take_mutex(adm, id, h) then
        hold_for_mutex(adm, id, h)
        redis.call('HSET', KEYS[1], id, cjson.encode(h))
      elseif h.s == 'queued' and not h.hd and h.a == 0 and not h.rc and needs_admission(h.w) then
        kind = 'admit'
      elseif h.s == 'queued' and not h.hd then
        kind = 'run'
        if h.rc then
          h.rc = nil
        else
          fresh = h.a == 0  -- a first attempt that never ran has no history to replay
          h.a = h.a + 1
          h.x = nil
        end
        h.st = now
        if not h.sa then h.sa = now end
        set_status(KEYS[6], id, h, 'running')
      elseif h.s == 'failed' and h.h then
        kind = 'hook'
      end
      if kind then
        if not token_base then token_base = redis.call('INCR', KEYS[8]) end
        local token = token_base .. '.' .. got
        h.o = ARGV[1]
        local encoded = cjson.encode(h)
        redis.call('HSET', KEYS[1], id, encoded)
        leases[#leases + 1] = id
        leases[#leases + 1] = token
        owned[#owned + 1] = id
        out[#out + 1] = id
        out[#out + 1] = kind
        out[#out + 1] = token
        out[#out + 1] = encoded
        out[#out + 1] = redis.call('HGET', KEYS[2], id) or 'null'
        out[#out + 1] = fresh and '' or (redis.call('HGET', KEYS[3], id) or '')
        out[#out + 1] = kind == 'hook' and (redis.call('HGET', KEYS[4], id) or '') or ''
        got = got + 1
      end
    end
  end
  if redis.call('LLEN', ready) > 0 then ring(bell) end
  local head = redis.call('ZRANGE', sched, 0, 0, 'WITHSCORES')
  if head[2] then
    local at = tonumber(head[2])
    if not next_due or at < next_due then next_due = at end
  end
end
if #leases > 0 then
  redis.call('HSET', KEYS[5], unpack(leases))
  redis.call('SADD', KEYS[9], unpack(owned))
end
if next_due then
  out[2] = math.max(0, next_due - now)
end
return out
