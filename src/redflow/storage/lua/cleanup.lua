-- cleanup: delete up to ARGV[1] runs whose retention deadline has passed, with every index entry
-- and record they own.
-- KEYS[1] runs
-- KEYS[2] inputs
-- KEYS[3] results
-- KEYS[4] errors
-- KEYS[5] steps
-- KEYS[6] leases
-- KEYS[7] index
-- KEYS[8] expiry
-- ARGV[1] max runs to delete
-- ARGV[2] cut-off in epoch ms (0 = server time now)
-- RETURNS {C.OK, runs deleted}
--!include common

local cutoff = tonumber(ARGV[2])
if cutoff == 0 then cutoff = now_ms() end
local ids = redis.call('ZRANGEBYSCORE', KEYS[8], '-inf', cutoff, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(ids) do
  local raw = redis.call('HGET', KEYS[1], id)
  if raw then
    local h = cjson.decode(raw)
    local wf = wf_tag(h)
    redis.call('ZREM', KEYS[7], 's:' .. h.s .. ':' .. id, 'ws:' .. wf .. ':' .. h.s .. ':' .. id,
      'w:' .. wf .. ':' .. id)
  end
  redis.call('HDEL', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
  redis.call('HDEL', KEYS[4], id)
  redis.call('HDEL', KEYS[5], id)
  redis.call('HDEL', KEYS[6], id)
  redis.call('ZREM', KEYS[8], id)
end
return {C.OK, #ids}
