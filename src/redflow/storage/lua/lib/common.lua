-- Shared helpers, inlined by the loader where a script says `--!include common`.

-- Server time in milliseconds: every due time, lease and timestamp comes from here.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function wf_tag(h)
  return string.len(h.w) .. ':' .. h.w
end

-- Moves the run's status entries in the lexicographic index (members s:<status>:<id> and
-- ws:<len>:<wf>:<status>:<id>) from h.s to `status`, and sets h.s.
local function set_status(index_key, id, h, status)
  local wf = wf_tag(h)
  if h.s then
    redis.call('ZREM', index_key, 's:' .. h.s .. ':' .. id, 'ws:' .. wf .. ':' .. h.s .. ':' .. id)
  end
  redis.call('ZADD', index_key, 0, 's:' .. status .. ':' .. id, 0, 'ws:' .. wf .. ':' .. status .. ':' .. id)
  h.s = status
end

-- Leaves one token in a queue's bell list, waking one worker blocked on it.
local function ring(bell_key)
  if redis.call('LLEN', bell_key) == 0 then
    redis.call('LPUSH', bell_key, '1')
  end
end
