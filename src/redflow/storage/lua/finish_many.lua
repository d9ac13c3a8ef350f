-- finish_many: finish.lua for several runs one worker ended in the same loop tick, in one call (the
-- KEYS are sent once, not once per run). Each run is decided on its own, in ARGV order, exactly as
-- finish.lua decides one, so a run sees what the runs before it in the call handed on. A run that
-- needs a queue it was not given is left untouched (NEED_QUEUES): the caller finishes it alone.
-- KEYS[1] runs
-- KEYS[2] leases
-- KEYS[3] results
-- KEYS[4] errors
-- KEYS[5] index
-- KEYS[6] expiry
-- KEYS[7] owned        owned:<worker id>
-- KEYS[8] limits
-- KEYS[9] held
-- KEYS[10] mutexes
-- KEYS[11] steps
-- KEYS[12] attempts
-- KEYS[13] waits
-- KEYS[14] waiters
-- KEYS[15] running
-- KEYS[16] outbox
-- KEYS[17..] queues     ready, sched, bell of each queue named in ARGV[3]; after them, the stream
--                       key (stream:<run id>) of each run, in ARGV order
-- ARGV[1] retention in ms
-- ARGV[2] done channel prefix (the run id completes each run's channel)
-- ARGV[3] queues: the runs' queues, and any other queue they may hand on to, one per line
-- ARGV[4..] runs      five values per run: id, fencing token, status ('succeeded' | 'failed' |
--                     'canceled'), output or error JSON, 1 when an on_failure hook must run else 0
-- RETURNS {C.OK, code 1, detail 1, code 2, detail 2, ...}, a pair per run in ARGV order:
--         C.OK and the final status | C.STALE and '' | C.WRONG_STATUS and the status |
--         C.NEED_QUEUES and the queues it needs, one per line
--!include common
--!include transitions

local queues = 0
for _ in string.gmatch(ARGV[3], '[^\n]+') do queues = queues + 1 end
local streams_at = 16 + 3 * queues
local now = now_ms()
local out = {C.OK}
local later = new_later()
-- A run ended before an error in the call (Redis keeps what a script wrote before it failed)
-- still gets its deferred writes: the error is raised again once they are written.
local ok, err = pcall(function()
  for i = 1, (#ARGV - 3) / 5 do
    local at = 3 + (i - 1) * 5
    local id = ARGV[at + 1]
    local code, detail = C.STALE, ''
    if holds_lease(id, ARGV[at + 2]) then
      local h = load_run(id)
      if not h or not expect_status(h, 'running', 'queued') then
        code, detail = C.WRONG_STATUS, h and h.s or ''
      else
        local p, missing = plan(id, h, {running = h.s == 'running', ends = true, later = later})
        if #missing > 0 then
          code, detail = C.NEED_QUEUES, table.concat(missing, '\n')
        else
          local status, payload, hook = ARGV[at + 3], ARGV[at + 4], ARGV[at + 5] == '1'
          if h.cr then
            status, payload, hook = 'canceled', canceled_error(id, h, h.cx or ''), false
          end
          K.stream = KEYS[streams_at + i]
          end_run(id, h, status, payload, p, now, {retention_ms = ARGV[1], channel = ARGV[2] .. id,
            keep_owner = hook and status == 'failed', later = later})
          code, detail = C.OK, status
        end
      end
    end
    out[#out + 1] = code
    out[#out + 1] = detail
  end
end)
flush_later(later)
if not ok then error(err, 0) end
return out
