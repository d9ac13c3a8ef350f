-- hook_done: the on_failure hook of a failed run has run; the run leaves its worker. Parents were
-- resumed when the run ended. Calling it again with the same token after a lost reply is harmless.
-- KEYS[1] runs
-- KEYS[2] leases
-- KEYS[3] owned        owned:<worker id>
-- ARGV[1] run id
-- ARGV[2] fencing token
-- RETURNS {C.OK} | {C.STALE} | {C.WRONG_STATUS, status}
--!include common
--!include transitions

local id = ARGV[1]
if not holds_lease(id, ARGV[2]) then return {C.STALE} end
local h = load_run(id)
if not expect_status(h, 'failed') then return wrong_status(h) end
h.h = nil
disown(id, h)
save_run(id, h)
return {C.OK}
