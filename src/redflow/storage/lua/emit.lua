-- emit: record an event and deliver it: one run per subscribing workflow (created here, in one
-- batch) and the resumption of every run waiting for this event name and correlation key. An event
-- with a future emit time is recorded as pending and delivered later by the leader (ARGV[9] =
-- 'deliver'). Delivery is all-or-nothing: the caller names the queues it expects; if a subscriber or
-- waiter needs a queue it did not name, nothing is written and C.NEED_QUEUES lists what to add.
-- Under a prefix with several partitions, an event with a correlation key is also put in the outbox
-- once for every other partition (ARGV[19]): handoff_event applies it there, for the runs waiting
-- in that partition.
-- A step of a parent whose cancellation was requested cannot emit (C.CANCELED); a delayed event of
-- such a parent creates no subscriber runs when it comes due (its deliveries are 'failed').
-- KEYS[1] runs
-- KEYS[2] inputs
-- KEYS[3] index
-- KEYS[4] events
-- KEYS[5] event_data
-- KEYS[6] event_index
-- KEYS[7] event_expiry
-- KEYS[8] event_buffer
-- KEYS[9] events_due
-- KEYS[10] subscriber_index
-- KEYS[11] subscribers
-- KEYS[12] waits
-- KEYS[13] waiters
-- KEYS[14] steps
-- KEYS[15] children
-- KEYS[16] event_idempotency  evidem:<n>:<event>:<key> (a placeholder when ARGV[7] is 0)
-- KEYS[17] outbox
-- KEYS[18..] queues      ready, sched, bell of each queue named in ARGV[17]
-- ARGV[1] event id
-- ARGV[2] event name
-- ARGV[3] data JSON
-- ARGV[4] correlation key ('' = none)
-- ARGV[5] parent run id ('' = none)
-- ARGV[6] emit at, epoch ms (0 = now)
-- ARGV[7] idempotency TTL in seconds (0 = no idempotency key)
-- ARGV[8] retention in ms
-- ARGV[9] mode: 'emit' (new event) or 'deliver' (a pending event that is due)
-- ARGV[10] fingerprint of (name, data, correlation key, parent)
-- ARGV[11] subscriber member prefix (<len>:<event>:)
-- ARGV[12] waiter member prefix (<len>:<event>:<len>:<key>:), '' without a correlation key
-- ARGV[13] event buffer member prefix, '' without a correlation key
-- ARGV[14] event buffer bound per (event, key)
-- ARGV[15] a fresh run id's first 24 characters (time-sortable, random); the i-th subscriber's run
--          id is its first 20 characters, six base32 characters for i, and ARGV[16]
-- ARGV[16] run id suffix ('-<partition>')
-- ARGV[17] queues: the subscribers' and waiters' queues the caller expects, one per line
-- ARGV[18] trace context of the caller, given to the subscribers' runs ('' = none)
-- ARGV[19] the other partitions of the prefix, by index, comma-separated ('' = none)
-- RETURNS {C.CREATED|C.EXISTING, event id, status, record JSON} | {C.NEED_QUEUES, missing queue, ...}
--       | {C.CANCELED} (the parent run was canceled: nothing was written)
--       | {C.NOT_FOUND} (deliver of an unknown event) | {C.TERMINAL, event id} (conflicting reuse)
--!include common
--!include runs

-- The data JSON of an event_data record, byte for byte as emitted. The record is written below as
-- '{"id":<id>,"name":<name>,"data":<data>,"ts":<ts>}' with id and name encoded by cjson, so the data
-- starts right after that fixed head and ends before the last ',"ts":' (ts is a plain number).
-- User JSON is never decoded here: cjson would round numbers and turn [] into {}.
local function data_slice(record, id, name)
  local head = '{"id":' .. cjson.encode(id) .. ',"name":' .. cjson.encode(name) .. ',"data":'
  local tail = string.find(record, ',"ts":[-+.%deE]+}$')
  if string.sub(record, 1, #head) ~= head or not tail then error('emit: malformed event data record of ' .. id) end
  return string.sub(record, #head + 1, tail - 1)
end

-- Six Crockford base32 characters of i: with the 20 characters before them, the i-th subscriber's
-- run id is distinct from every other subscriber's of the same event (for i < 32^6).
local B32 = '0123456789ABCDEFGHJKMNPQRSTVWXYZ'
local function b32_index(i)
  local out = ''
  for _ = 1, 6 do
    local d = i % 32
    out = string.sub(B32, d + 1, d + 1) .. out
    i = math.floor(i / 32)
  end
  return out
end

local id = ARGV[1]
local mode = ARGV[9]
local existing = redis.call('HGET', KEYS[4], id)
if mode == 'emit' then
  if tonumber(ARGV[7]) > 0 then
    local bound = redis.call('GET', KEYS[16])
    if bound and redis.call('HEXISTS', KEYS[4], bound) == 1 then
      if existing and bound ~= id then return {C.TERMINAL, id} end
      id = bound
      existing = redis.call('HGET', KEYS[4], id)
    end
  end
  if existing then
    local rec = cjson.decode(existing)
    if rec.fp ~= ARGV[10] then return {C.TERMINAL, id} end
    return {C.EXISTING, id, rec.fanout_status, existing}
  end
  if parent_canceled(KEYS[1], ARGV[5]) then return {C.CANCELED} end
elseif not existing then
  return {C.NOT_FOUND}
end

local now = now_ms()
local rec
if mode == 'emit' then
  rec = {id = id, name = ARGV[2], ts = now, fp = ARGV[10], deliveries = {}, resumed_run_ids = {},
    subscriber_count = 0, delivery_count = 0, failed_delivery_count = 0, resumed_run_count = 0,
    fanout_status = 'pending'}
  if ARGV[4] ~= '' then rec.correlation_key = ARGV[4] end
  if ARGV[5] ~= '' then rec.parent_run_id = ARGV[5] end
  local emit_at = tonumber(ARGV[6])
  if emit_at > now then
    rec.ts = emit_at
    rec.next_process_at = emit_at
  end
  if tonumber(ARGV[7]) > 0 then redis.call('SET', KEYS[16], id, 'EX', tonumber(ARGV[7])) end
  redis.call('HSET', KEYS[5], id, '{"id":' .. cjson.encode(id) .. ',"name":' .. cjson.encode(ARGV[2]) ..
    ',"data":' .. ARGV[3] .. ',"ts":' .. rec.ts .. '}')
  local ts = string.format('%013d', rec.ts)
  redis.call('ZADD', KEYS[6], 0, 'a:' .. ts .. ':' .. id, 0, 'n:' .. ARGV[11] .. ts .. ':' .. id)
  if rec.next_process_at then
    redis.call('HSET', KEYS[4], id, cjson.encode(rec))
    redis.call('ZADD', KEYS[9], rec.next_process_at, id)
    return {C.CREATED, id, 'pending', cjson.encode(rec)}
  end
else
  rec = cjson.decode(existing)
  if rec.fanout_status ~= 'pending' then return {C.EXISTING, id, rec.fanout_status, existing} end
end

local queues = K.queues
local missing = {}
local subs = redis.call('ZRANGEBYLEX', KEYS[10], '[' .. ARGV[11], '[' .. ARGV[11] .. '\255')
local subscribers = {}
for _, member in ipairs(subs) do
  local sub = cjson.decode(redis.call('HGET', KEYS[11], member) or '{}')
  if sub.queue then
    subscribers[#subscribers + 1] = sub
    if not queues[sub.queue] then missing[#missing + 1] = sub.queue end
  end
end
local waiting = {}
if ARGV[12] ~= '' then waiting = event_waiters(KEYS[1], KEYS[13], ARGV[12], queues, missing) end
if #missing > 0 then return need_queues(missing) end

local data = redis.call('HGET', KEYS[5], id)
local input = ARGV[3]
if mode == 'deliver' then input = data_slice(data, id, rec.name) end
if #subscribers >= 32 ^ 6 then return redis.error_reply('emit: too many subscribers for event ' .. ARGV[2]) end
local deliveries = {}
local run_id_head = string.sub(ARGV[15], 1, 20)
-- Children of a canceled parent would escape its cancel cascade: a due event of one starts none.
local orphaned = parent_canceled(KEYS[1], rec.parent_run_id or '')
for i, sub in ipairs(subscribers) do
  local q = queues[sub.queue]
  local run_id = run_id_head .. b32_index(i) .. ARGV[16]
  if orphaned then
    rec.failed_delivery_count = (rec.failed_delivery_count or 0) + 1
  elseif redis.call('HEXISTS', KEYS[1], run_id) == 0 then
    create_run({runs = KEYS[1], inputs = KEYS[2], index = KEYS[3], ready = q.ready, sched = q.sched,
      bell = q.bell, children = KEYS[15]}, run_id, sub.workflow, sub.queue, input, sub.max_attempts, 0,
      rec.parent_run_id or '', '', now, ARGV[18])
  end
  deliveries[#deliveries + 1] = {workflow = sub.workflow, queue = sub.queue,
    status = orphaned and 'failed' or 'delivered', run_id = not orphaned and run_id or nil,
    error = orphaned and ('parent run ' .. rec.parent_run_id .. ' was canceled') or nil,
    subscriber_event_id = id .. ':' .. sub.workflow}
end
local resumed = {}
for _, wr in ipairs(waiting) do
  local q = queues[wr.q]
  local w = resume_waiter({runs = KEYS[1], index = KEYS[3], waits = KEYS[12], waiters = KEYS[13],
    steps = KEYS[14], ready = q.ready, sched = q.sched, bell = q.bell}, wr.id, 'event', nil, 'event', data, now)
  if w then resumed[#resumed + 1] = wr.id end
end
if ARGV[13] ~= '' then
  local ts = string.format('%013d', rec.ts)
  buffer_event(KEYS[8], ARGV[13], ARGV[13] .. ts .. ':' .. id, tonumber(ARGV[14]))
  rec.buffer_member = ARGV[13] .. ts .. ':' .. id
  for target in string.gmatch(ARGV[19], '[^,]+') do
    redis.call('ZADD', KEYS[17], now, target .. ':' .. id)
  end
end
rec.deliveries = deliveries
rec.resumed_run_ids = resumed
rec.subscriber_count = #subscribers
rec.delivery_count = #deliveries - (orphaned and #deliveries or 0)
rec.resumed_run_count = #resumed
rec.fanout_status = #subscribers == 0 and 'no-subscribers' or (orphaned and 'failed' or 'completed')
rec.finished_at = now
rec.next_process_at = nil
redis.call('ZREM', KEYS[9], id)
local encoded = cjson.encode(rec)
redis.call('HSET', KEYS[4], id, encoded)
redis.call('ZADD', KEYS[7], now + tonumber(ARGV[8]), id)
return {mode == 'emit' and C.CREATED or C.EXISTING, id, rec.fanout_status, encoded}
