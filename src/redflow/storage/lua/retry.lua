-- retry: schedule a running run again ARGV[3] ms from now (server time): a failed attempt that will
-- be retried, or (ARGV[5] = 1) a run deferred without ending its attempt, e.g. one this worker
-- cannot execute because it lacks the workflow's definition. A failed run whose on_failure hook
-- is pending is deferred the same way (it stays failed; the hook runs when it is claimed again).
-- KEYS[1] runs
-- KEYS[2] leases
-- KEYS[3] errors
-- KEYS[4] index
-- KEYS[5] owned        owned:<worker id>
-- KEYS[6] limits
-- KEYS[7] held
-- KEYS[8] mutexes
-- KEYS[9] attempts
-- KEYS[10] waiters      (read by plan only for a run that ends; declared so every helper's key is given)
-- KEYS[11] running
-- KEYS[12..] queues    ready, sched, bell of each queue named in ARGV[6]
-- ARGV[1] run id
-- ARGV[2] fencing token
-- ARGV[3] delay in ms
-- ARGV[4] error JSON of the failed attempt
-- ARGV[5] 1 to keep the attempt number (deferral), 0 to start a new attempt when claimed
-- ARGV[6] queues: the run's queue, and any other queue it may hand on to, one per line
-- RETURNS {C.OK} | {C.STALE} | {C.CANCELED} (its cancellation was requested: end it as canceled)
--       | {C.WRONG_STATUS, status} | {C.NEED_QUEUES, queue, ...}
--!include common
--!include transitions

local id = ARGV[1]
if not holds_lease(id, ARGV[2]) then return {C.STALE} end
local h = load_run(id)
local defer = ARGV[5] == '1'
local now = now_ms()
local due = now + tonumber(ARGV[3])
if h.s == 'failed' and h.h and defer then
  if not K.queues[h.q] then return need_queues({h.q}) end
  disown(id, h)
  save_run(id, h)
  schedule_at(K.queues[h.q].sched, K.queues[h.q].bell, id, due)
  return {C.OK}
end
if not expect_status(h, 'running', 'queued') then return wrong_status(h) end
if h.cr then return {C.CANCELED} end
-- A deferred run (not a failed attempt: kept attempt, or not started) keeps its throttle-queue place.
local p, missing = plan(id, h, {running = h.s == 'running', keep_place = defer or h.s ~= 'running'})
if #missing > 0 then return need_queues(missing) end
if not defer then attempt_record(id, h, 'failed', ARGV[4], now) end
h.av = due
h.e = 1  -- an error is stored: a later success clears it
redis.call('HSET', K.errors, id, ARGV[4])
if defer and h.a > 0 then h.rc = 1 end
set_status(K, id, h, 'scheduled')
stop_running(id, h, p)
save_run(id, h)
schedule_at(K.queues[h.q].sched, K.queues[h.q].bell, id, due)
return {C.OK}
