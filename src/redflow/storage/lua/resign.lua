-- resign: a worker that stopped cleanly leaves: its liveness entry and, if it leads, the leadership
-- go at once so another process takes over without waiting for a lease to lapse. Runs it still owns
-- (none after a clean stop) are left for the reaper.
-- KEYS[1] workers
-- KEYS[2] leader
-- KEYS[3] owned        owned:<worker id>
-- ARGV[1] worker id
-- RETURNS {C.OK}

local mine = ARGV[1] .. ':'
local leader = redis.call('GET', KEYS[2])
if leader and string.sub(leader, 1, #mine) == mine then
  redis.call('DEL', KEYS[2])
end
if redis.call('SCARD', KEYS[3]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], 0, ARGV[1])
end
return {C.OK}
