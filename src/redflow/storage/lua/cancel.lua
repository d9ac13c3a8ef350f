-- cancel: cancel a run. A queued or scheduled run that no worker holds (waiting and held runs
-- included) ends as canceled at once. A run a worker holds (running, or claimed for admission)
-- gets the request recorded (h.cr) and pushed to that worker's control channel; every transition
-- the worker makes next ends it as canceled, and so does the reaper if the worker dies. Terminal
-- runs are left alone. A run with children is added to `cascade`: the engine cancels its
-- descendants from there (durably: the entry stays until every child was canceled), and no child
-- can be started for it any more.
-- KEYS[1] runs
-- KEYS[2] index
-- KEYS[3] results
-- KEYS[4] errors
-- KEYS[5] expiry
-- KEYS[6] waits
-- KEYS[7] waiters
-- KEYS[8] steps
-- KEYS[9] attempts
-- KEYS[10] leases
-- KEYS[11] limits
-- KEYS[12] held
-- KEYS[13] mutexes
-- KEYS[14] children
-- KEYS[15] cascade
-- KEYS[16] running
-- KEYS[17] outbox
-- KEYS[18..] queues    ready, sched, bell of each queue named in ARGV[6]
-- ARGV[1] run id
-- ARGV[2] reason ('' = default message)
-- ARGV[3] retention in ms
-- ARGV[4] done channel of the run
-- ARGV[5] control channel prefix (the owning worker's id is appended)
-- ARGV[6] queues: the run's queue, and any other queue it may hand on to, one per line
-- RETURNS {C.OK, 'canceled'} | {C.OK, 'requested'} | {C.TERMINAL, status} | {C.NOT_FOUND}
--       | {C.NEED_QUEUES, queue, ...}
--!include common
--!include transitions

local id = ARGV[1]
local h = load_run(id)
if not h then return {C.NOT_FOUND} end
if is_terminal(h.s) then return {C.TERMINAL, h.s} end
local now = now_ms()
local function cascade()
  local p = id .. ':'
  if #redis.call('ZRANGEBYLEX', K.children, '[' .. p, '[' .. p .. '\255', 'LIMIT', 0, 1) > 0 then
    redis.call('ZADD', K.cascade, now, id)
  end
end
if h.s == 'running' or h.o then
  if not h.cr then
    h.cr = now
    if ARGV[2] ~= '' then h.cx = ARGV[2] end
    save_run(id, h)
  end
  if h.o then redis.call('PUBLISH', ARGV[5] .. h.o, id) end
  cascade()
  return {C.OK, 'requested'}
end
local p, missing = plan(id, h, {ends = true})
if #missing > 0 then return need_queues(missing) end
h.cr = now
if ARGV[2] ~= '' then h.cx = ARGV[2] end
end_run(id, h, 'canceled', canceled_error(id, h, ARGV[2]), p, now, {retention_ms = ARGV[3], channel = ARGV[4]})
cascade()
return {C.OK, 'canceled'}
