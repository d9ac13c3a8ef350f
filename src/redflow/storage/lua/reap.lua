-- reap: the leader takes back one run of a worker whose liveness lease lapsed. A running run goes
-- back to the claim end of its queue for the same attempt (its recorded steps are kept), unless
-- this was its ARGV[3]-th consecutive lapse: then it fails with kind 'crashed' and is queued once
-- more to run its on_failure hook. A run whose cancellation was requested ends as canceled. A run
-- claimed for admission goes back to its queue; a failed run whose hook was pending is queued for
-- the hook again, until it has lapsed 2 x ARGV[3] times. Once the worker owns nothing, its entry
-- is removed.
-- KEYS[1] workers
-- KEYS[2] leader
-- KEYS[3] runs
-- KEYS[4] leases
-- KEYS[5] index
-- KEYS[6] results
-- KEYS[7] errors
-- KEYS[8] expiry
-- KEYS[9] owned        owned:<dead worker id>
-- KEYS[10] limits
-- KEYS[11] held
-- KEYS[12] mutexes
-- KEYS[13] steps
-- KEYS[14] attempts
-- KEYS[15] waits
-- KEYS[16] waiters
-- KEYS[17] running
-- KEYS[18] outbox
-- KEYS[19..] queues    ready, sched, bell of each queue named in ARGV[7]
-- ARGV[1] leader value of the caller (its fencing token)
-- ARGV[2] dead worker id
-- ARGV[3] consecutive lapses of one attempt before the run fails as crashed
-- ARGV[4] retention in ms
-- ARGV[5] done-channel prefix (the run id is appended)
-- ARGV[6] run id to take back ('' = none: only drop the worker's entry if it owns nothing)
-- ARGV[7] queues: the run's queue, and any other queue it may hand on to, one per line
-- RETURNS {C.NOT_LEADER} | {C.ALIVE} | {C.NEED_QUEUES, queue, ...}
--       | {C.OK, outcome ('requeued' | 'crashed' | 'canceled' | 'hook' | 'gave_up' | 'gone'), runs left}
--!include common
--!include transitions

if redis.call('GET', K.leader) ~= ARGV[1] then return {C.NOT_LEADER} end
local now = now_ms()
local wid = ARGV[2]
local score = redis.call('ZSCORE', K.workers, wid)
if score and tonumber(score) >= now then return {C.ALIVE} end

local function done(outcome)
  local left = redis.call('SCARD', K.owned)
  if left == 0 then redis.call('ZREM', K.workers, wid) end
  return {C.OK, outcome, left}
end

local id = ARGV[6]
if id == '' or redis.call('SISMEMBER', K.owned, id) == 0 then return done('gone') end
local h = load_run(id)
if not h then
  redis.call('SREM', K.owned, id)
  redis.call('HDEL', K.leases, id)
  return done('gone')
end
local max_lapses = tonumber(ARGV[3])
local lapses = (h.x or 0) + 1
local outcome
if h.s == 'failed' then
  outcome = (h.h and lapses < 2 * max_lapses) and 'hook' or 'gave_up'
elseif h.cr then
  outcome = 'canceled'
elseif h.s == 'running' and lapses >= max_lapses then
  outcome = 'crashed'
elseif h.s == 'running' or h.s == 'queued' then
  outcome = 'requeued'
else
  outcome = 'gone'
end
local ends = outcome == 'canceled' or outcome == 'crashed'
local p, missing = plan(id, h, {running = h.s == 'running', ends = ends, keep_place = not ends})
if #missing > 0 then return need_queues(missing) end
local channel = ARGV[5] .. id
local q = K.queues[h.q]
if outcome == 'canceled' then
  end_run(id, h, 'canceled', canceled_error(id, h, h.cx or ''), p, now, {retention_ms = ARGV[4], channel = channel})
elseif outcome == 'crashed' then
  h.x = lapses
  h.h = 1
  end_run(id, h, 'failed', cjson.encode({name = 'CrashedError', kind = 'crashed',
    message = 'run ' .. id .. ' of workflow ' .. h.w .. ': its worker died ' .. lapses ..
      ' times in a row during attempt ' .. h.a}), p, now, {retention_ms = ARGV[4], channel = channel})
  redis.call('RPUSH', q.ready, id)
  ring(q.bell)
else
  if outcome == 'requeued' then
    if h.s == 'running' then
      h.x = lapses
      h.rc = 1
      set_status(K, id, h, 'queued')
    end
  elseif outcome == 'hook' then
    h.x = lapses
  elseif outcome == 'gave_up' then
    h.h = nil
  end
  stop_running(id, h, p)
  save_run(id, h)
  if outcome == 'requeued' or outcome == 'hook' then
    redis.call('RPUSH', q.ready, id)
    ring(q.bell)
  end
end
redis.call('SREM', K.owned, id)
redis.call('HDEL', K.leases, id)
return done(outcome)
