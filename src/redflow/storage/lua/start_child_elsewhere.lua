-- start_child_elsewhere: run ARGV[2] of this partition starts child ARGV[1], which lives in another
-- partition (a workflow with a limit lives in p0). Recorded here, atomically with the parent's
-- cancel check: the child in the parent's child index (so a cancel cascades to it) and an outbox
-- entry with the child's creation record. The applier creates the child in its partition, then
-- reads the parent again and cancels the child if the parent was canceled meanwhile: with the
-- cascade's own order (cancel the parent, then its indexed children), one of the two sees the other.
-- KEYS[1] runs
-- KEYS[2] children
-- KEYS[3] idempotency  idem:<wf>:<key> (read only when ARGV[3] > 0)
-- KEYS[4] outbox
-- KEYS[5] outbox_data
-- KEYS[6] child_ends
-- ARGV[1] child run id
-- ARGV[2] parent run id
-- ARGV[3] idempotency TTL in seconds (0 = no idempotency key)
-- ARGV[4] outbox member (n<index>:<child id>)
-- ARGV[5] the child's creation record
-- ARGV[6] a child id the key may be bound to that is known gone (never created, or deleted): the
--         binding is replaced ('' = none)
-- RETURNS {C.CREATED, child id} | {C.EXISTING, child id} | {C.CANCELED} (the parent was canceled)
--!include common
--!include runs

local id, parent = ARGV[1], ARGV[2]
if parent_canceled(KEYS[1], parent) then return {C.CANCELED} end
if redis.call('ZSCORE', KEYS[2], parent .. ':' .. id) then return {C.EXISTING, id} end
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  local bound = redis.call('GET', KEYS[3])
  if bound and bound ~= ARGV[6] then
    -- Bound to a child that is live or succeeded (as far as this partition knows: a child that
    -- ended failed or canceled has left its outcome here) keeps the binding.
    local ended = redis.call('HGET', KEYS[6], bound)
    local status = ended and string.match(ended, '^(%a+)')
    if status ~= 'failed' and status ~= 'canceled' then return {C.EXISTING, bound} end
  end
  redis.call('SET', KEYS[3], id, 'EX', ttl)
end
redis.call('ZADD', KEYS[2], 0, parent .. ':' .. id)
redis.call('ZADD', KEYS[4], now_ms(), ARGV[4])
redis.call('HSET', KEYS[5], ARGV[4], ARGV[5])
return {C.CREATED, id}
