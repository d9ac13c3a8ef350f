-- heartbeat: renew a worker's liveness lease (which covers every run it holds) and its leadership,
-- or take the vacant leadership under a new epoch. One call per worker process per interval.
-- KEYS[1] workers
-- KEYS[2] leader
-- KEYS[3] epoch
-- KEYS[4] cron_version
-- KEYS[5] events_due
-- KEYS[6] cascade
-- ARGV[1] worker id
-- ARGV[2] liveness lease in ms
-- ARGV[3] leader lease in ms
-- ARGV[4] 1 to stand for leader, 0 to stay out
-- RETURNS {C.OK, state, leader value or '', workers whose lease lapsed, server time ms,
--          cron version, due time of the next delayed event or -1, cancel cascades left pending}
--         state: 0 = no entry (first registration, or the worker was reaped: its runs were taken
--         over), 1 = renewed in time, 2 = the lease had lapsed but the worker was not reaped yet
--!include common

local now = now_ms()
local wid = ARGV[1]
local prev = redis.call('ZSCORE', KEYS[1], wid)
local state = 1
if not prev then
  state = 0
elseif tonumber(prev) < now then
  state = 2
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), wid)

local leader = redis.call('GET', KEYS[2])
local mine = wid .. ':'
if leader and string.sub(leader, 1, #mine) == mine then
  if ARGV[4] == '1' then
    redis.call('PEXPIRE', KEYS[2], ARGV[3])
  else
    redis.call('DEL', KEYS[2])
    leader = nil
  end
elseif not leader and ARGV[4] == '1' then
  leader = mine .. redis.call('INCR', KEYS[3])
  redis.call('SET', KEYS[2], leader, 'PX', ARGV[3])
end
local dead = redis.call('ZCOUNT', KEYS[1], '-inf', '(' .. now)
local due = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
return {C.OK, state, leader or '', dead, now, tonumber(redis.call('GET', KEYS[4]) or '0'),
  due[2] and tonumber(due[2]) or -1, redis.call('ZCARD', KEYS[6])}
