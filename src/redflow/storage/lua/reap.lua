-- reap: the leader takes back the runs of a worker whose liveness lease lapsed. A running run goes
-- back to the claim end of its queue for the same attempt (its recorded steps are kept), unless this
-- was its ARGV[3]-th lapse in that attempt: then it fails with kind 'crashed' and is queued once more
-- to run its on_failure hook. A failed run whose hook was pending is queued for the hook again.
-- KEYS[1] workers
-- KEYS[2] leader
-- KEYS[3] runs
-- KEYS[4] leases
-- KEYS[5] index
-- KEYS[6] errors
-- KEYS[7] expiry
-- KEYS[8] owned        owned:<dead worker id>
-- KEYS[9] limits
-- KEYS[10] held
-- KEYS[11] mutexes
-- KEYS[12..] ready, bell of each queue named in ARGV[8..], in that order (2 keys per queue)
-- ARGV[1] leader value of the caller (its fencing token)
-- ARGV[2] dead worker id
-- ARGV[3] lapses of one attempt before the run fails as crashed
-- ARGV[4] retention in ms
-- ARGV[5] done-channel prefix (the run id is appended)
-- ARGV[6] unused (kept for a stable argument layout)
-- ARGV[7] number of queues n
-- ARGV[8..] n queue names, then the run ids to take back (members of the owned set the caller read;
--          ids no longer in the set are skipped)
-- RETURNS {C.NOT_LEADER} | {C.ALIVE} | {C.OK, runs taken back, runs failed as crashed, runs left}
--!include common

if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return {C.NOT_LEADER}
end
local now = now_ms()
local wid = ARGV[2]
local score = redis.call('ZSCORE', KEYS[1], wid)
if score and tonumber(score) >= now then
  return {C.ALIVE}
end

local queues = {}
local nq = tonumber(ARGV[7])
for i = 8, 7 + nq do
  local k = 12 + (i - 8) * 2
  queues[ARGV[i]] = {KEYS[k], KEYS[k + 1]}
end

local max_lapses = tonumber(ARGV[3])
local taken, crashed = 0, 0
local skipped = {}
for i = 8 + nq, #ARGV do
  local id = ARGV[i]
  local raw = nil
  if redis.call('SREM', KEYS[8], id) == 1 then raw = redis.call('HGET', KEYS[3], id) end
  if raw then
    local h = cjson.decode(raw)
    local q = queues[h.q]
    if not q then
      skipped[#skipped + 1] = id
    else
      redis.call('HDEL', KEYS[4], id)
      h.o = nil
      local requeue = false
      if h.s == 'running' then
        h.x = (h.x or 0) + 1
        if h.x >= max_lapses then
          h.f = now
          set_status(KEYS[5], id, h, 'failed')
          h.h = 1
          redis.call('HSET', KEYS[6], id, cjson.encode({
            name = 'CrashedError', kind = 'crashed',
            message = 'run ' .. id .. ' of workflow ' .. h.w .. ': its worker died ' .. h.x ..
              ' times during attempt ' .. h.a}))
          redis.call('ZADD', KEYS[7], now + tonumber(ARGV[4]), id)
          redis.call('PUBLISH', ARGV[5] .. id, 'failed')
          crashed = crashed + 1
        else
          h.rc = 1
          set_status(KEYS[5], id, h, 'queued')
        end
        requeue = true
      elseif h.s == 'queued' then
        requeue = true  -- claimed for admission, not started yet
      elseif h.s == 'failed' and h.h then
        h.x = (h.x or 0) + 1
        if h.x >= 2 * max_lapses then
          h.h = nil
        else
          requeue = true
        end
      end
      redis.call('HSET', KEYS[3], id, cjson.encode(h))
      if requeue then
        redis.call('RPUSH', q[1], id)
        ring(q[2])
      end
      release_held({runs = KEYS[3], index = KEYS[5], limits = KEYS[9], held = KEYS[10], ready = q[1],
        bell = q[2]}, h.q, h.w)
      release_mutex({runs = KEYS[3], mutexes = KEYS[11], held = KEYS[10], ready = q[1], bell = q[2]}, id, h)
      taken = taken + 1
    end
  end
end
if #skipped > 0 then
  redis.call('SADD', KEYS[8], unpack(skipped))
end
local left = redis.call('SCARD', KEYS[8])
if left == 0 then
  redis.call('ZREM', KEYS[1], wid)
end
return {C.OK, taken, crashed, left}
