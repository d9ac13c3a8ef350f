-- requeue: an operator's retry of a failed or canceled run. The run goes back to the end of its
-- queue as queued and runs again as its next attempt, replaying its history: completed steps keep
-- their outputs, failed and canceled steps run again. It gets a fresh attempt budget (as many
-- attempts as it had at first), passes admission again (throttle, rate limit, mutex) when its
-- workflow has limits, and leaves the retention schedule until it ends again. Its last error stays
-- readable until it succeeds. A child of a canceled parent is not requeued.
-- KEYS[1] runs
-- KEYS[2] index
-- KEYS[3] expiry
-- KEYS[4] ready        q:<queue>:ready
-- KEYS[5] bell         q:<queue>:bell
-- ARGV[1] run id
-- RETURNS {C.OK} | {C.NOT_FOUND} | {C.WRONG_STATUS, status}
--       | {C.HELD} (a failed run whose on_failure hook has not finished)
--       | {C.CANCELED} (its parent was canceled)
--!include common
--!include transitions
--!include runs

local id = ARGV[1]
local h = load_run(id)
if not h then return {C.NOT_FOUND} end
if not expect_status(h, 'failed', 'canceled') then return wrong_status(h) end
if h.h or h.o then return {C.HELD} end
if parent_canceled(K.runs, h.p) then return {C.CANCELED} end
h.mb = h.mb or h.m  -- the attempt budget the run was created with
h.m = h.a + h.mb
h.f, h.cr, h.cx, h.x, h.rc = nil, nil, nil, nil, nil
h.e = 1  -- the last error is kept until the run succeeds
h.ad = 1  -- admission again (a first start only is admitted otherwise)
h.av = now_ms()
set_status(K.index, id, h, 'queued')
save_run(id, h)
redis.call('ZREM', K.expiry, id)
redis.call('LPUSH', K.ready, id)
ring(K.bell)
return {C.OK}
