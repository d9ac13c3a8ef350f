-- history: read a run's step history (every line, in order) in one call.
-- KEYS[1] steps
-- ARGV[1] run id
-- RETURNS {C.OK, lines (one JSON object per line)}
--!include common

return {C.OK, history_read(K.steps, ARGV[1])}
