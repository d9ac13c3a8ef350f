-- release: a stopping worker hands a run back. A running run goes to the claim end of its queue and
-- keeps its attempt number (h.rc); this is not counted as a crash. A run claimed for admission goes
-- back unchanged; a failed run with a pending hook is requeued for its hook. A running run whose
-- cancellation was requested ends as canceled instead.
-- KEYS[1] runs
-- KEYS[2] leases
-- KEYS[3] results
-- KEYS[4] errors
-- KEYS[5] index
-- KEYS[6] expiry
-- KEYS[7] owned        owned:<worker id>
-- KEYS[8] limits
-- KEYS[9] held
-- KEYS[10] mutexes
-- KEYS[11] steps
-- KEYS[12] attempts
-- KEYS[13] waits
-- KEYS[14] waiters
-- KEYS[15] running
-- KEYS[16] outbox
-- KEYS[17..] queues    ready, sched, bell of each queue named in ARGV[5]
-- ARGV[1] run id
-- ARGV[2] fencing token
-- ARGV[3] retention in ms
-- ARGV[4] done channel of the run
-- ARGV[5] queues: the run's queue, and any other queue it may hand on to, one per line
-- RETURNS {C.OK, status} | {C.STALE} | {C.WRONG_STATUS, status} | {C.NEED_QUEUES, queue, ...}
--!include common
--!include transitions

local id = ARGV[1]
if not holds_lease(id, ARGV[2]) then return {C.STALE} end
local h = load_run(id)
if not expect_status(h, 'running', 'queued', 'failed') then return wrong_status(h) end
if h.s == 'failed' and not h.h then return wrong_status(h) end
local p, missing = plan(id, h, {running = h.s == 'running', ends = h.cr ~= nil, keep_place = not h.cr})
if #missing > 0 then return need_queues(missing) end
local now = now_ms()
if h.cr and h.s ~= 'failed' then
  end_run(id, h, 'canceled', canceled_error(id, h, h.cx or ''), p, now,
    {retention_ms = ARGV[3], channel = ARGV[4]})
  return {C.OK, 'canceled'}
end
if h.s == 'running' then
  h.rc = 1
  set_status(K, id, h, 'queued')
end
stop_running(id, h, p)
save_run(id, h)
redis.call('RPUSH', K.queues[h.q].ready, id)
ring(K.queues[h.q].bell)
return {C.OK, h.s}
