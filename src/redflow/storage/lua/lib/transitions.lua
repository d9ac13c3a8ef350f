-- Transitions shared by every script that ends, stops or hands on a run. Needs common.lua. Keys
-- come from the generated table K (names as in the script's header); K.queues maps each queue
-- the caller named to {ready, sched, bell}.
--
-- Every such script first reads (expect_status, plan), returns {C.NEED_QUEUES, ...} when the plan
-- needs a queue it was not given, and only then writes (stop_running, end_run): a refused call
-- writes nothing.

local function load_run(id)
  local raw = redis.call('HGET', K.runs, id)
  if not raw then return nil end
  return decode_run(raw)
end

local function save_run(id, h)
  redis.call('HSET', K.runs, id, encode_run(h))
end

-- True when the run's status is one of the arguments.
local function expect_status(h, ...)
  for _, status in ipairs({...}) do
    if h.s == status then return true end
  end
  return false
end

local function wrong_status(h)
  return {C.WRONG_STATUS, h.s}
end

local function holds_lease(id, token)
  return redis.call('HGET', K.leases, id) == token
end

-- Deferred writes of a script that ends several runs in one call (opts.later): outputs, retention
-- deadlines, owned-set removals and the index members of the ended runs, which nothing later in
-- the call reads or removes, leave in one command each when the script calls flush_later; the
-- running count of a workflow drops once per call, and before plan reads it (counted_running).
local function new_later()
  return {results = {}, expiry = {}, owned = {}, index = {}, running = {}}
end

-- Writes the running-count decrements of workflow `w` gathered in `later` (all when w is nil).
local function drop_running(later, w)
  for wf, n in pairs(later.running) do
    if (w == nil or wf == w) and n > 0 then
      if redis.call('HINCRBY', K.running, wf, -n) <= 0 then redis.call('HDEL', K.running, wf) end
      later.running[wf] = 0
    end
  end
end

-- Runs of workflow `w` running now, decrements `later` gathered included.
local function counted_running(w, later)
  if later then drop_running(later, w) end
  return running_count(K.running, w)
end

local function flush_later(later)
  drop_running(later, nil)
  each_slice(later.results, 1000, function(...) return redis.call('HSET', K.results, ...) end)
  each_slice(later.expiry, 1000, function(...) return redis.call('ZADD', K.expiry, ...) end)
  each_slice(later.index, 1000, function(...) return redis.call('ZADD', K.index, ...) end)
  if K.owned then each_slice(later.owned, 1000, function(...) return redis.call('SREM', K.owned, ...) end) end
end

-- The run leaves its worker: no lease, not in the owned set the caller named.
local function disown(id, h, later)
  redis.call('HDEL', K.leases, id)
  if later then
    later.owned[#later.owned + 1] = id
  elseif K.owned then
    redis.call('SREM', K.owned, id)
  end
  h.o = nil
end

-- Held runs wait outside the ready lists, in FIFO order per group, in zset `held` (lex):
-- c:<tag(workflow)><seq>:<id> for max_concurrency, m:<tag(mutex field)><seq>:<id> for a mutex,
-- t:<tag(throttle group)><seq>:<id> for a throttle window (h.tq is the member, h.tg the group).
local function held_prefix(kind, group)
  return kind .. ':' .. tag(group)
end

-- Workflows found with no run held for capacity during this call (plan skips their reads until a
-- run is held for one again).
local none_held = {}

local function held_add(kind, group, id)
  if kind == 'c' then none_held[group] = nil end
  local member = held_prefix(kind, group) .. string.format('%013d', redis.call('INCR', K.seq)) .. ':' .. id
  redis.call('ZADD', K.held, 0, member)
  return member
end

-- At most n members of a held group, from its start, or after member `after`.
local function held_page(kind, group, n, after)
  local p = held_prefix(kind, group)
  return redis.call('ZRANGEBYLEX', K.held, after and '(' .. after or '[' .. p, '[' .. p .. '\255', 'LIMIT', 0, n)
end

local function held_first(kind, group, n)
  return held_page(kind, group, n)
end

-- Mutexes: hash `mutexes` maps <tag(key)> (h.mf) to the run holding it, only while it runs; a key
-- is one mutex for every workflow of the prefix.
local function mutex_free_for(id, h)
  if not h.mf then return true end
  local holder = redis.call('HGET', K.mutexes, h.mf)
  return not holder or holder == id
end

-- The header of run `id` for a hand-on: the header, false when the run is gone, nil when it cannot
-- be read (not MessagePack, not a map, or no queue). A damaged run must neither fail the call
-- handing on to it nor keep its place at the head of a group, where it would block every run behind
-- it. A header that decodes to nil (MessagePack nil) is damaged, not gone: the run is still there.
local function readable_run(id)
  local raw = redis.call('HGET', K.runs, id)
  if not raw then return false end
  local ok, r = pcall(decode_run, raw)
  if not ok or type(r) ~= 'table' or type(r.q) ~= 'string' then return nil end
  return r
end

-- Damaged held runs read per page while a plan looks for the runs it hands on. Every damaged run it
-- finds before them is moved aside (once: it leaves the group), however many there are: a bound
-- would leave the readable runs behind them held with their slot, mutex or turn free, and nothing
-- else hands them on.
local DAMAGED_MAX = 10

-- A damaged held run leaves its group for the ready list of `queue`, where a claim reports it.
local function move_aside(member, queue)
  redis.call('ZREM', K.held, member)
  local q = K.queues[queue]
  redis.call('RPUSH', q.ready, id_of(member))
  ring(q.bell)
end

-- When `member` heads throttle queue `group`: the run after it that can be read (or is gone: waking
-- it clears its member) and that run's queue, and the damaged runs between them, which the caller
-- moves aside (move_aside), so they neither fail its call nor block the line.
local function next_in_line(group, member)
  local line = held_first('t', group, 2 + DAMAGED_MAX)
  local damaged = {}
  if line[1] ~= member then return nil, damaged, nil end
  local size, i = 2 + DAMAGED_MAX, 2
  while line[i] do
    local r = readable_run(id_of(line[i]))
    if r ~= nil then return line[i], damaged, r and r.q or nil end
    damaged[#damaged + 1] = line[i]
    if line[i + 1] then
      i = i + 1
    elseif #line == size then  -- only damaged runs so far: the next page
      size, i = DAMAGED_MAX, 1
      line = held_page('t', group, size, line[#line])
    else
      break
    end
  end
  return nil, damaged, nil
end

-- What run `id` hands on when it stops running (opts.running: it was counted as running) or ends
-- (opts.ends): the next waiter of its mutex, runs held for its workflow's capacity, the next run
-- of its throttle queue (unless opts.keep_place: a run handed back keeps its place in that queue),
-- and the parents waiting for it. Reads only, besides writing the running-count drops of runs
-- ended before it in the call (opts.later). Returns the plan and the queues it needs that the
-- caller did not name.
local function plan(id, h, opts)
  local p = {moves = {}, parents = {}, keep_place = opts.keep_place}
  local missing, asked = {}, {}
  local function need(q)
    if not K.queues[q] and not asked[q] then
      asked[q] = true
      missing[#missing + 1] = q
    end
  end
  -- Plans moving held run `member` to its queue; returns false when it is damaged: it then goes to
  -- the ready list of this run's queue (its own is unknown), where a claim reports it unclaimable.
  local function move(member)
    local mid = id_of(member)
    local r = readable_run(mid)
    if r then
      p.moves[#p.moves + 1] = {member = member, id = mid, q = r.q}
      need(r.q)
    elseif r == false then
      p.moves[#p.moves + 1] = {member = member}
    else
      p.moves[#p.moves + 1] = {member = member, id = mid, q = h.q, damaged = true}
      return false
    end
    return true
  end
  -- Moves the first n runs of a held group that can be read, and the damaged ones before them.
  local function move_first(kind, group, n)
    local size = n + DAMAGED_MAX
    local held = held_first(kind, group, size)
    local found, moved = #held, 0
    while true do
      for _, member in ipairs(held) do
        if moved >= n then return found end
        if move(member) then moved = moved + 1 end
      end
      if moved >= n or #held < size then return found end
      size = n - moved + DAMAGED_MAX  -- only damaged runs so far: the next page
      held = held_page(kind, group, size, held[#held])
    end
  end
  need(h.q)
  if h.mf and redis.call('HGET', K.mutexes, h.mf) == id then
    p.free_mutex = true
    move_first('m', h.mf, 1)
  end
  if opts.running and not none_held[h.w] then
    local limit = redis.call('HGET', K.limits, h.w)
    local free = 100  -- no limit any more: release what was held under the old one, in batches
    if limit then free = tonumber(limit) - (counted_running(h.w, opts.later) - 1) end
    if free > 0 and move_first('c', h.w, free) == 0 then none_held[h.w] = true end
  end
  if h.tq and not opts.keep_place then
    -- Leaving a throttle queue at its head hands the head to the next run in it.
    local nxt, damaged, q = next_in_line(h.tg, h.tq)
    for _, m in ipairs(damaged) do p.moves[#p.moves + 1] = {member = m, id = id_of(m), q = h.q, damaged = true} end
    p.next_throttled = nxt
    if q then need(q) end
  end
  if opts.ends then
    local prefix = 'c:' .. id .. ':'
    for _, member in ipairs(redis.call('ZRANGEBYLEX', K.waiters, '[' .. prefix, '[' .. prefix .. '\255')) do
      local parent = string.sub(member, #prefix + 1)
      local r = readable_run(parent)  -- a damaged parent cannot resume: it is left waiting
      if r then
        p.parents[#p.parents + 1] = {id = parent, q = r.q}
        need(r.q)
      end
    end
  end
  return p, missing
end

-- Moves a held run to the claim end of its queue.
local function unhold(mv)
  redis.call('ZREM', K.held, mv.member)
  if not mv.id then return end
  if mv.damaged then return move_aside(mv.member, mv.q) end
  local r = load_run(mv.id)
  if r and r.hd == mv.member then
    r.hd = nil
    save_run(mv.id, r)
    local q = K.queues[mv.q]
    redis.call('RPUSH', q.ready, mv.id)
    ring(q.bell)
  end
end

-- Sends the head of a throttle queue to admission (it stays in the queue until admitted).
local function wake_throttled(member)
  local mid = id_of(member)
  local r = load_run(mid)
  if not r or r.tq ~= member then
    redis.call('ZREM', K.held, member)
    return
  end
  local q = K.queues[r.q]
  if r.s == 'scheduled' then
    redis.call('ZREM', q.sched, mid)
    set_status(K, mid, r, 'queued')
    save_run(mid, r)
  end
  redis.call('RPUSH', q.ready, mid)
  ring(q.bell)
end

-- Applies a plan: the run stops running (or waiting, or being held) and hands on what it held.
-- With keep_owner the lease and owned entry stay (a failure whose on_failure hook is pending).
local function stop_running(id, h, p, keep_owner, later)
  if not keep_owner then disown(id, h, later) end
  if p.free_mutex then redis.call('HDEL', K.mutexes, h.mf) end
  if h.hd then
    redis.call('ZREM', K.held, h.hd)
    h.hd = nil
  end
  if h.tq and not p.keep_place then
    redis.call('ZREM', K.held, h.tq)
    h.tq, h.tg = nil, nil
  end
  for _, mv in ipairs(p.moves) do unhold(mv) end
  if p.next_throttled then wake_throttled(p.next_throttled) end
end

-- Drops the pending durable wait of a run that ends without resuming.
local function drop_wait(id)
  local wraw = redis.call('HGET', K.waits, id)
  if wraw then
    local w = cjson.decode(wraw)
    if w.m then redis.call('ZREM', K.waiters, w.m) end
    redis.call('HDEL', K.waits, id)
  end
end

-- Appends the end of attempt h.a to the run's attempt records.
local function attempt_record(id, h, status, payload, now)
  if h.a == 0 then return end  -- no attempt started (a run refused or deferred at admission)
  -- HSETNX: the first ending of an attempt is its record (a retry's failure is not overwritten by a
  -- later cancel of the scheduled run).
  redis.call('HSETNX', K.attempts, id .. ':' .. h.a, '{"a":' .. h.a .. ',"o":' .. payload .. ',"t0":' ..
    (h.st or now) .. ',"t1":' .. now .. ',"r":"' .. status .. '"}')
end

-- The one place a run ends. Writes the status, the output or error, the attempt record (every
-- ending but success, whose record is the run itself), the retention deadline and the done
-- message; ends its stream; drops its wait and due time; hands on what it held (plan) and resumes
-- every parent waiting for it (a parent in another partition through the outbox). opts:
-- retention_ms, channel, keep_owner (on_failure pending), later (see new_later).
local function end_run(id, h, status, payload, p, now, opts)
  local was = h.s
  h.f = now
  local later = opts.later
  if status ~= 'succeeded' then attempt_record(id, h, status, payload, now) end
  set_status(K, id, h, status, later)
  if status == 'succeeded' then
    if later then
      later.results[#later.results + 1] = id
      later.results[#later.results + 1] = payload
    else
      redis.call('HSET', K.results, id, payload)
    end
    if h.e then
      redis.call('HDEL', K.errors, id)
      h.e = nil
    end
  else
    redis.call('HSET', K.errors, id, payload)
  end
  if was == 'scheduled' or was == 'queued' then
    drop_wait(id)
    redis.call('ZREM', K.queues[h.q].sched, id)
  end
  h.rc = nil
  if opts.keep_owner then h.h = 1 end
  stop_running(id, h, p, opts.keep_owner, later)
  save_run(id, h)
  if later then
    later.expiry[#later.expiry + 1] = now + tonumber(opts.retention_ms)
    later.expiry[#later.expiry + 1] = id
  else
    redis.call('ZADD', K.expiry, now + tonumber(opts.retention_ms), id)
  end
  -- The message carries the outcome when it is small, so a waiting result() needs no read.
  if #payload <= 16384 then
    redis.call('PUBLISH', opts.channel, status .. '\n' .. payload)
  else
    redis.call('PUBLISH', opts.channel, status)
  end
  if K.stream and redis.call('EXISTS', K.stream) == 1 then
    -- Tells stream readers the run ended, with the attempt that ended it (an operator may retry it).
    redis.call('XADD', K.stream, '*', 'end', status, 'a', h.a)
  end
  for _, parent in ipairs(p.parents) do
    local q = K.queues[parent.q]
    resume_waiter({runs = K.runs, index = K.index, waits = K.waits, waiters = K.waiters, steps = K.steps,
      ready = q.ready, sched = q.sched, bell = q.bell}, parent.id, 'child', id, status, payload, now)
  end
  -- A parent in another partition learns of the end through this partition's outbox (child_ended).
  local there = h.p and string.match(h.p, '%-p(%d+)$')
  if there and there ~= string.match(id, '%-p(%d+)$') then
    redis.call('ZADD', K.outbox, now, 'c' .. there .. ':' .. id)
  end
end
