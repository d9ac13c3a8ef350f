-- cancel: cancel a run. A queued or scheduled run (waiting runs included) ends as canceled at once;
-- for a running run the request is recorded (h.cr) and pushed to its worker's control channel, and
-- the worker ends it. Terminal runs are left alone. A waiting parent of a run canceled here is
-- resumed with the outcome 'canceled'.
-- KEYS[1] runs
-- KEYS[2] index
-- KEYS[3] errors
-- KEYS[4] expiry
-- KEYS[5] waits
-- KEYS[6] waiters
-- KEYS[7] steps
-- KEYS[8] scheduled    q:<queue>:sched of the run
-- KEYS[9] held
-- KEYS[10] parent ready   (KEYS[10..12] only when the run has a waiting parent)
-- KEYS[11] parent sched
-- KEYS[12] parent bell
-- ARGV[1] run id
-- ARGV[2] reason ('' = default message)
-- ARGV[3] retention in ms
-- ARGV[4] done channel of the run
-- ARGV[5] control channel prefix (the owning worker's id is appended)
-- RETURNS {C.OK, 'canceled'} | {C.OK, 'requested'} | {C.TERMINAL, status} | {C.NOT_FOUND}
--       | {C.RETRY} when the run has a waiting parent but KEYS[10..12] were not given
--!include common

local id = ARGV[1]
local raw = redis.call('HGET', KEYS[1], id)
if not raw then return {C.NOT_FOUND} end
local h = cjson.decode(raw)
if h.s == 'succeeded' or h.s == 'failed' or h.s == 'canceled' then
  return {C.TERMINAL, h.s}
end
local now = now_ms()
if h.s == 'running' then
  if not h.cr then
    h.cr = now
    if ARGV[2] ~= '' then h.cx = ARGV[2] end
    redis.call('HSET', KEYS[1], id, cjson.encode(h))
  end
  if h.o then redis.call('PUBLISH', ARGV[5] .. h.o, id) end
  return {C.OK, 'requested'}
end
if h.pq and #KEYS < 12 then return {C.RETRY} end
local err = canceled_error(id, h, ARGV[2])
drop_wait(KEYS[5], KEYS[6], id)
redis.call('ZREM', KEYS[8], id)
if h.hd then
  redis.call('ZREM', KEYS[9], h.hd)
  h.hd = nil
end
h.f = now
h.cr = now
h.rc = nil
set_status(KEYS[2], id, h, 'canceled')
redis.call('HSET', KEYS[1], id, cjson.encode(h))
redis.call('HSET', KEYS[3], id, err)
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[3]), id)
redis.call('PUBLISH', ARGV[4], 'canceled')
if h.pq then
  resume_waiter({runs = KEYS[1], index = KEYS[2], waits = KEYS[5], waiters = KEYS[6], steps = KEYS[7],
    ready = KEYS[10], sched = KEYS[11], bell = KEYS[12]}, h.p, 'child', id, 'canceled', err, now)
end
return {C.OK, 'canceled'}
