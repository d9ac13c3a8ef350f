-- requeue: an operator's retry of a failed or canceled run. The run goes back to its queue as
-- queued and runs again as its next attempt, replaying its history: completed steps keep their
-- outputs, failed and canceled steps run again. It gets a fresh attempt budget (as many attempts as
-- it had at first), passes admission again (throttle, rate limit, mutex) when its workflow has
-- limits, and leaves the retention schedule until it ends again. Its last error stays readable until
-- it succeeds. Refused: a run whose on_failure hook has not finished, or whose cancellation is still
-- reaching its children (`cascade`); a child that was canceled (its parent starts its children
-- again when it is retried), or whose parent is canceled; a run whose idempotency key now belongs to
-- another live or succeeded run (else the key is bound to it again). A request token (a bulk job's
-- id) makes a repeated request harmless: the run remembers the last token that requeued it.
-- KEYS[1] runs
-- KEYS[2] index
-- KEYS[3] expiry
-- KEYS[4] cascade
-- KEYS[5] ready        q:<queue>:ready
-- KEYS[6] bell         q:<queue>:bell
-- KEYS[7] idempotency  idem:<wf>:<key> of the run's idempotency key (a placeholder when it has none)
-- KEYS[8] running
-- ARGV[1] run id
-- ARGV[2] request token ('' = none)
-- RETURNS {C.OK} | {C.OK, 'repeat'} (this token requeued it already) | {C.NOT_FOUND}
--       | {C.WRONG_STATUS, status}
--       | {C.HELD, 'hook' | 'cascade'} (its on_failure hook, or its cancel cascade, is not done)
--       | {C.CANCELED, 'parent' | 'child'} | {C.EXISTING, run id} (its idempotency key is taken)
--!include common
--!include transitions
--!include runs

local id, token = ARGV[1], ARGV[2]
local h = load_run(id)
if not h then return {C.NOT_FOUND} end
if token ~= '' and h.rq == token then return {C.OK, 'repeat'} end
if not expect_status(h, 'failed', 'canceled') then return wrong_status(h) end
if h.h or h.o then return {C.HELD, 'hook'} end
if redis.call('ZSCORE', K.cascade, id) then return {C.HELD, 'cascade'} end
if parent_canceled(K.runs, h.p) then return {C.CANCELED, 'parent'} end
if h.p and h.s == 'canceled' then return {C.CANCELED, 'child'} end
if h.ik then
  local bound = redis.call('GET', K.idempotency)
  if bound and bound ~= id then
    local other = load_run(bound)
    if other and other.s ~= 'failed' and other.s ~= 'canceled' then return {C.EXISTING, bound} end
    redis.call('SET', K.idempotency, id, 'KEEPTTL')
  end
end
h.mb = h.mb or h.m  -- the attempt budget the run was created with
h.m = h.a + h.mb
h.f, h.cr, h.cx, h.x, h.rc = nil, nil, nil, nil, nil
h.e = 1  -- the last error is kept until the run succeeds
h.ad = 1  -- admission again (a first start only is admitted otherwise)
h.rq = token ~= '' and token or nil
h.av = now_ms()
set_status(K, id, h, 'queued')
save_run(id, h)
redis.call('ZREM', K.expiry, id)
redis.call('LPUSH', K.ready, id)
ring(K.bell)
return {C.OK}
