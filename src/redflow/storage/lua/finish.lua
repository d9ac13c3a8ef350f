-- finish: end a running run as succeeded, failed or canceled, if the caller holds the current token.
-- A queued run the caller holds (claimed for admission, not started) can end the same way: failed
-- when its admission keys cannot be computed, canceled when its cancellation was requested.
-- A run whose cancellation was requested ends as canceled whatever the handler returned. A failure
-- that must run an on_failure hook (ARGV 5 is 1) keeps the run owned (token and owned set) until the
-- hook has run; hook_done releases it: the terminal status is durable before any hook runs. Every parent waiting
-- for this run is resumed with its outcome.
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
-- KEYS[15] stream       stream:<run id> (exists only if the run streamed values)
-- KEYS[16] running
-- KEYS[17] outbox
-- KEYS[18..] queues     ready, sched, bell of each queue named in ARGV[8]
-- ARGV[1] run id
-- ARGV[2] fencing token
-- ARGV[3] status ('succeeded' | 'failed' | 'canceled')
-- ARGV[4] output JSON (succeeded) or error JSON (failed, canceled)
-- ARGV[5] 1 when an on_failure hook must run, else 0
-- ARGV[6] retention in ms
-- ARGV[7] done channel of the run
-- ARGV[8] queues: the run's queue, and any other queue it may hand on to, one per line
-- RETURNS {C.OK, final status} | {C.STALE} | {C.WRONG_STATUS, status} | {C.NEED_QUEUES, queue, ...}
--!include common
--!include transitions

local id = ARGV[1]
if not holds_lease(id, ARGV[2]) then return {C.STALE} end
local h = load_run(id)
if not expect_status(h, 'running', 'queued') then return wrong_status(h) end
local p, missing = plan(id, h, {running = h.s == 'running', ends = true})
if #missing > 0 then return need_queues(missing) end
local status, payload, hook = ARGV[3], ARGV[4], ARGV[5] == '1'
if h.cr then
  status, payload, hook = 'canceled', canceled_error(id, h, h.cx or ''), false
end
end_run(id, h, status, payload, p, now_ms(), {retention_ms = ARGV[6], channel = ARGV[7],
  keep_owner = hook and status == 'failed'})
return {C.OK, status}
