-- claim: promote due scheduled runs, then hand up to ARGV[2] runs of the worker's queues to
-- worker ARGV[1], each under a new fencing token. A run whose workflow is at its max_concurrency,
-- or whose mutex another run holds, is held aside (not claimed, not blocking the queue) until a run
-- that stops running hands it on. A first start of a workflow with admission limits is handed out
-- as kind 'admit' (still queued): the worker computes its admission keys from the input and calls
-- admit.lua. A due run that was waiting durably has its wait resolved as 'timeout' (the end of a
-- sleep, or a wait's deadline) and resumes on its own attempt. A queued run starts a new attempt
-- unless it was handed back or recovered (h.rc); a failed run with a pending hook (h.h) is claimed
-- to run on_failure. A run the call cannot read or write is put back and reported ('unclaimable');
-- a key of the partition or of a queue holding another type fails the call with a 'WRONGTYPE claim:'
-- error before it writes anything.
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
-- KEYS[16] running
-- KEYS[17..] queues    ready, sched, bell of each queue named in ARGV[4], in that order
-- ARGV[1] worker id
-- ARGV[2] max runs to claim
-- ARGV[3] max scheduled runs to promote per queue
-- ARGV[4] queues: the worker's queues, one per line
-- ARGV[5] nonce: random, fresh for every call; a run's fencing token is <nonce>.<n>, so tokens stay
--         unique even when the server restarts from a snapshot that forgot earlier claims
-- RETURNS {C.STALE_WORKER} when the worker's liveness lease lapsed
--       | {C.OK, ms until the next scheduled run (-1: none), then 7 fields per run:
--          id, kind ('run'|'hook'|'admit'), token, header (MessagePack), input JSON, steps ('' for a first
--          attempt that never ran), error JSON (hooks only, else '')
--          then the same 7 fields for each run the call could not read or write: id, 'unclaimable',
--          four '', and the error raised (the run was put back: ready at the back, due in a minute;
--          at most UNCLAIMABLE_MAX of a queue's ready runs per call)}
--!include common
--!include transitions

local now = now_ms()
local alive = redis.call('ZSCORE', K.workers, ARGV[1])
if not alive or tonumber(alive) < now then
  return {C.STALE_WORKER}
end
-- The keys written outside take's pcall (promotion's RPUSH, the batched writes, the bell) must hold
-- their type before the call writes anything: a WRONGTYPE after the RPOP would abort the call with
-- the popped runs out of their list (Redis keeps a script's writes made before it raised). Checked
-- once, just before the first write, so a claim that finds nothing to do costs no TYPE calls.
local checked = false
local function wrong_type()
  if checked then return nil end
  checked = true
  local expected = {{K.runs, 'hash'}, {K.inputs, 'hash'}, {K.leases, 'hash'}, {K.owned, 'set'},
    {K.index, 'zset'}, {K.running, 'hash'}}
  for queue in string.gmatch(ARGV[4], '[^\n]+') do
    local q = K.queues[queue]
    expected[#expected + 1] = {q.ready, 'list'}
    expected[#expected + 1] = {q.sched, 'zset'}
    expected[#expected + 1] = {q.bell, 'list'}
  end
  for _, k in ipairs(expected) do  -- {key from KEYS, type}
    local t = redis.call('TYPE', k[1]).ok
    if t ~= 'none' and t ~= k[2] then
      return 'WRONGTYPE claim: key ' .. k[1] .. ' holds a ' .. t .. ', not a ' .. k[2] .. '; nothing was claimed'
    end
  end
  return nil
end

local want = tonumber(ARGV[2])
-- Per-call caches and batched writes: one HSET of leases, one SADD.
local leases, owned, headers = {}, {}, {}
local unindexed, started = {}, {}  -- index members removed, runs started per workflow
local seen = {}
local limits_cache, admission_cache = {}, {}
local function limit_of(w)
  if limits_cache[w] == nil then limits_cache[w] = redis.call('HGET', K.limits, w) or false end
  return limits_cache[w]
end
local function needs_admission(w)
  if admission_cache[w] == nil then admission_cache[w] = redis.call('HEXISTS', K.admission, w) == 1 end
  return admission_cache[w]
end
-- What this claim does with queued run `id` (header `raw`): hold it (written here, returns nothing),
-- or hand it out as (kind, header as claimed, fresh, steps, error). Writes nothing else, so a run
-- it raises on is left as it was; the caller batches the writes of the runs handed out.
local function take(id, raw)
  local h = decode_run(raw)
  -- A header without the fields every run has is damaged too: reported, never silently dropped.
  if type(h) ~= 'table' or type(h.s) ~= 'string' or type(h.q) ~= 'string' or type(h.w) ~= 'string' then
    error('not a run header')
  end
  if h.o then return nil end
  -- A held run moved aside while its header was damaged (move_aside in transitions.lua), and restored
  -- since, still names the member it left: it is held no more, or no longer in its throttle line.
  if h.hd and not redis.call('ZSCORE', K.held, h.hd) then h.hd = nil end
  if h.s == 'scheduled' and h.tq and not redis.call('ZSCORE', K.held, h.tq) then
    h.tq, h.tg = nil, nil
    set_status(K, id, h, 'queued')
  end
  local queued = h.s == 'queued' and not h.hd
  local limit = false
  if queued then limit = limit_of(h.w) end
  local kind, fresh = nil, false
  if limit and running_count(K.running, h.w) + (started[h.w] or 0) >= tonumber(limit) then
    h.hd = held_add('c', h.w, id)
    save_run(id, h)
    return nil
  elseif queued and not mutex_free_for(id, h) then
    h.hd = held_add('m', h.mf, id)
    save_run(id, h)
    return nil
  elseif queued and (h.a == 0 or h.ad) and not h.rc and needs_admission(h.w) then
    kind = 'admit'
  elseif queued then
    kind = 'run'
    if h.rc then
      h.rc = nil
    else
      fresh = h.a == 0 and not h.rf  -- a first attempt has no history, unless it replays a run
      h.a = h.a + 1
      h.x = nil
      h.ad = nil
    end
    h.st = now
    if not h.sa then h.sa = now end
    -- set_status(K, id, h, 'running') in batched form: the caller removes the index members once
    -- for the whole claim and grows the running count once per workflow; until then the runs
    -- started here are counted in `started`, so max_concurrency sees them.
    h.s = 'running'
  elseif h.s == 'failed' and h.h then
    kind = 'hook'
  else
    return nil
  end
  local steps = fresh and '' or history_read(K.steps, id)
  local err = kind == 'hook' and (redis.call('HGET', K.errors, id) or '') or ''
  if kind == 'run' and h.mf then redis.call('HSET', K.mutexes, h.mf, id) end  -- the last write: nothing raises after it
  h.o = ARGV[1]
  return kind, h, fresh, steps, err
end
local unclaimable = {}  -- {ready list (false: left scheduled), id, error} of runs a step here raised on
local UNCLAIMABLE_MAX = 100

-- A due scheduled run becomes queued (its durable wait, if any, resolved as 'timeout'); a failed run
-- whose on_failure hook was deferred goes back to its ready list.
local function promote_due(id, ready)
  local h = load_run(id)
  if h and h.s == 'scheduled' then
    local wraw = redis.call('HGET', K.waits, id)
    if wraw then
      local w = cjson.decode(wraw)
      resolve_wait(K.steps, id, w, h.a, 'timeout', 'null', now)
      if w.m then redis.call('ZREM', K.waiters, w.m) end
      redis.call('HDEL', K.waits, id)
      h.rc = 1
    end
    set_status(K, id, h, 'queued')
    save_run(id, h)
    redis.call('RPUSH', ready, id)
  elseif h and h.s == 'failed' and h.h and not h.o then
    redis.call('RPUSH', ready, id)
  end
end

local promote = tonumber(ARGV[3])
local out = {C.OK, -1}
local next_due = nil
local got = 0

for queue in string.gmatch(ARGV[4], '[^\n]+') do
  local ready, sched, bell = K.queues[queue].ready, K.queues[queue].sched, K.queues[queue].bell
  local due = redis.call('ZRANGEBYSCORE', sched, '-inf', now, 'LIMIT', 0, promote)
  if #due > 0 then
    local wrong = wrong_type()
    if wrong then return redis.error_reply(wrong) end
  end
  for _, id in ipairs(due) do
    local ok, err = pcall(promote_due, id, ready)
    if ok then
      redis.call('ZREM', sched, id)
    else  -- tried again in a minute; the worker logs the error
      redis.call('ZADD', sched, now + 60000, id)
      unclaimable[#unclaimable + 1] = {false, id, tostring(err)}
    end
  end
  -- At most UNCLAIMABLE_MAX runs of a queue are tried and put back per call: a clobbered key every
  -- run reads makes each one raise, and the call would pop, try and push back the whole queue.
  local put_back = #unclaimable
  while got < want and #unclaimable - put_back < UNCLAIMABLE_MAX do
    -- One RPOP and one HMGET per batch, in the order single pops would take them.
    local ids = redis.call('RPOP', ready, math.min(want - got, 500))
    if not ids then break end
    local wrong = wrong_type()
    if wrong then
      -- Only this pop has written: its runs go back where they were, in their order.
      local back = {}
      for i = #ids, 1, -1 do back[#back + 1] = ids[i] end
      redis.call('RPUSH', ready, unpack(back))
      return redis.error_reply(wrong)
    end
    local raws = redis.call('HMGET', K.runs, unpack(ids))
    for i, id in ipairs(ids) do
      -- An id listed twice is taken once: its header here predates this claim's writes.
      local raw = not seen[id] and raws[i]
      seen[id] = true
      if raw then
        local ok, kind, h, fresh, steps, err = pcall(take, id, raw)
        if not ok then
          -- A run this call cannot read or write (a corrupt header, a key of the wrong type) goes to
          -- the back of its queue once the batch is done, so it neither blocks the queue nor is lost;
          -- the worker logs the error.
          unclaimable[#unclaimable + 1] = {ready, id, tostring(kind)}
        elseif kind then
          if kind == 'run' then
            local wf = wf_tag(h)
            unindexed[#unindexed + 1] = 's:queued:' .. id
            unindexed[#unindexed + 1] = 'ws:' .. wf .. ':queued:' .. id
            started[h.w] = (started[h.w] or 0) + 1
          end
          local token = ARGV[5] .. '.' .. got
          local encoded = encode_run(h)
          headers[#headers + 1] = id
          headers[#headers + 1] = encoded
          leases[#leases + 1] = id
          leases[#leases + 1] = token
          owned[#owned + 1] = id
          out[#out + 1] = id
          out[#out + 1] = kind
          out[#out + 1] = token
          out[#out + 1] = encoded
          out[#out + 1] = false  -- the input, read below for the whole claim
          out[#out + 1] = steps
          out[#out + 1] = err
          got = got + 1
        end
      end
    end
  end
  -- Not when the call stopped at UNCLAIMABLE_MAX: the rest may be runs that raise too, and a worker
  -- woken for them would spin through them (the next claim, at the next bell or poll, goes on).
  if #unclaimable - put_back < UNCLAIMABLE_MAX and redis.call('LLEN', ready) > 0 then ring(bell) end
  local head = redis.call('ZRANGE', sched, 0, 0, 'WITHSCORES')
  if head[2] then
    local at = tonumber(head[2])
    if not next_due or at < next_due then next_due = at end
  end
end
for i = 1, #unclaimable do  -- LPUSHed in the order popped: the first popped is the first claimed again
  local u = unclaimable[i]
  local ready = u[1]
  if ready then redis.call('LPUSH', ready, u[2]) end
  out[#out + 1] = u[2]
  out[#out + 1] = 'unclaimable'
  out[#out + 1] = ''
  out[#out + 1] = ''
  out[#out + 1] = ''
  out[#out + 1] = ''
  out[#out + 1] = u[3]
end
if #leases > 0 then
  each_slice(headers, 1000, function(...) return redis.call('HSET', K.runs, ...) end)
  each_slice(leases, 1000, function(...) return redis.call('HSET', K.leases, ...) end)
  each_slice(owned, 1000, function(...) return redis.call('SADD', K.owned, ...) end)
  local inputs = each_slice(owned, 1000, function(...) return redis.call('HMGET', K.inputs, ...) end)
  for i = 1, #owned do out[3 + (i - 1) * 7 + 4] = inputs[i] or 'null' end
end
if #unindexed > 0 then
  each_slice(unindexed, 1000, function(...) return redis.call('ZREM', K.index, ...) end)
  for w, n in pairs(started) do redis.call('HINCRBY', K.running, w, n) end
end
if next_due then
  out[2] = math.max(0, next_due - now)
end
return out
