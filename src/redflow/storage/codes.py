"""Return codes of the Lua scripts: the one definition both languages use.

The script loader prepends ``local C = {OK = 0, ...}`` generated from :class:`Code` to every script,
so Lua code writes ``return {C.STALE}`` and never a bare number.
"""

from __future__ import annotations

from enum import IntEnum


class Code(IntEnum):
    OK = 0
    CREATED = 1
    EXISTING = 2
    STALE = 3  # the caller's fencing token is not the run's current one
    STALE_WORKER = 4  # the worker's liveness lease expired and it was reaped
    NOT_LEADER = 5  # the caller's leader token is not the current one
    ALIVE = 6  # the worker to reap renewed its lease after all
    NOT_FOUND = 7
    RESOLVED = 8  # a wait was satisfied at once (event already buffered, child already ended)
    CANCELED = 9  # the run's cancellation was requested: it must end as canceled
    TERMINAL = 11  # the run already ended
    NEED_QUEUES = 12  # the transition needs the keys of the queues listed after the code; nothing was written
    WRONG_STATUS = 13  # the run is not in a state this transition starts from; the current status follows
    THROTTLED = 14  # admission: the run waits for its throttle window (due ms follows, -1 behind others)
    RATE_LIMITED = 15  # admission: the run failed as rate limited (retry-after ms follows)
    HELD = 16  # admission: the run waits for its mutex or for workflow capacity


def lua_prelude() -> str:
    fields = ", ".join(f"{code.name} = {int(code)}" for code in Code)
    return f"local C = {{{fields}}}\n"
