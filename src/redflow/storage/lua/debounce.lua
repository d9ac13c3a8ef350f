-- debounce: enqueue through a debounce key. While the key's run has not started, a new call
-- replaces its input (latest wins) and moves its start to `period` after this call, but never past
-- `timeout` after the first call; otherwise a new run is created, scheduled `period` from now.
-- KEYS[1] runs
-- KEYS[2] inputs
-- KEYS[3] index
-- KEYS[4] ready        q:<queue>:ready
-- KEYS[5] scheduled    q:<queue>:sched
-- KEYS[6] bell         q:<queue>:bell
-- KEYS[7] children
-- KEYS[8] debounce     db:<wf>:<key>
-- ARGV[1] run id for a new run
-- ARGV[2] workflow name
-- ARGV[3] queue name
-- ARGV[4] input JSON
-- ARGV[5] max attempts
-- ARGV[6] period in ms
-- ARGV[7] timeout in ms (0 = no cap)
-- ARGV[8] parent run id ('' = none)
-- RETURNS {C.CREATED, run id, status} | {C.EXISTING, run id, status}
--       | {C.CANCELED} (the parent was canceled: no child is created)
--!include common
--!include runs

if parent_canceled(KEYS[1], ARGV[8]) then return {C.CANCELED} end
local now = now_ms()
local period, timeout = tonumber(ARGV[6]), tonumber(ARGV[7])
local bound = redis.call('GET', KEYS[8])
if bound then
  local raw = redis.call('HGET', KEYS[1], bound)
  if raw then
    local h = decode_run(raw)
    if h.s == 'scheduled' and h.a == 0 and h.db then
      redis.call('HSET', KEYS[2], bound, ARGV[4])
      local due = now + period
      if h.dl and due > h.dl then due = h.dl end
      if due <= now then
        redis.call('ZREM', KEYS[5], bound)
        h.av = now
        set_status({index = KEYS[3]}, bound, h, 'queued')
        redis.call('RPUSH', KEYS[4], bound)
        ring(KEYS[6])
      else
        h.av = due
        local head = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
        redis.call('ZADD', KEYS[5], due, bound)
        if not head[2] or due < tonumber(head[2]) then ring(KEYS[6]) end
      end
      redis.call('HSET', KEYS[1], bound, encode_run(h))
      -- The key must outlive the run's (moved) start, so a later call still finds it.
      redis.call('PEXPIREAT', KEYS[8], (h.av or now) + period)
      return {C.EXISTING, bound, h.s}
    end
  end
end

local id = ARGV[1]
local h = create_run({runs = KEYS[1], inputs = KEYS[2], index = KEYS[3], ready = KEYS[4], sched = KEYS[5],
  bell = KEYS[6], children = KEYS[7]}, id, ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), now + period, ARGV[8],
  '', now)
h.db = 1
if timeout > 0 then h.dl = now + timeout end
redis.call('HSET', KEYS[1], id, encode_run(h))
redis.call('SET', KEYS[8], id, 'PX', (timeout > 0 and timeout or period) + period)
return {C.CREATED, id, h.s}
