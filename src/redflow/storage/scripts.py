"""Loading of the Lua transitions and calling them by SHA.

Each ``lua/<name>.lua`` file opens with a header naming its KEYS, ARGV and returns. The loader inlines
``--!include <lib>`` lines from ``lua/lib/`` and prepends the return-code table from
:mod:`redflow.storage.codes`. Scripts are sent with EVALSHA (pipelined like any other command); on
NOSCRIPT (server restarted or flushed) the script is loaded again and the call retried once.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from .._redis.client import RedisClient
from .._redis.errors import NoScriptError
from .codes import lua_prelude

_INCLUDE = re.compile(r"^--!include (\w+)\s*$", re.MULTILINE)
_KEY_LINE = re.compile(r"^-- KEYS\[(\d+)(\.\.)?\] (\w+)", re.MULTILINE)
_ARG_LINE = re.compile(r"^-- ARGV\[(\d+)(\.\.)?\] ", re.MULTILINE)

SCRIPT_NAMES = (
    "enqueue",
    "claim",
    "step",
    "finish",
    "hook_done",
    "retry",
    "release",
    "heartbeat",
    "reap",
    "resign",
    "cleanup",
    "suspend",
    "cancel",
    "emit",
    "cron_fire",
    "resume_input",
    "admit",
    "debounce",
    "stream_write",
    "enqueue_batch",
)


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str  # as sent to the server
    sha: str
    key_names: tuple[str, ...]  # from the header, KEYS[1] first; a trailing '..' entry is variadic
    variadic_keys: bool
    arg_count: int
    variadic_args: bool


def _read(path: str) -> str:
    return (resources.files("redflow.storage") / "lua" / path).read_text(encoding="utf-8")


def _parse(name: str) -> Script:
    raw = _read(f"{name}.lua")
    body = _INCLUDE.sub(lambda m: _read(f"lib/{m.group(1)}.lua"), raw)
    source = lua_prelude() + body
    keys = _KEY_LINE.findall(raw)
    args = _ARG_LINE.findall(raw)
    return Script(
        name=name,
        source=source,
        sha=hashlib.sha1(source.encode()).hexdigest(),
        key_names=tuple(k[2] for k in keys),
        variadic_keys=bool(keys and keys[-1][1]),
        arg_count=len(args),
        variadic_args=bool(args and args[-1][1]),
    )


@cache
def load_scripts() -> dict[str, Script]:
    return {name: _parse(name) for name in SCRIPT_NAMES}


class ScriptRunner:
    """Calls scripts on one client; ``load_all`` once at start, NOSCRIPT handled per call."""

    def __init__(self, redis: RedisClient) -> None:
        self._redis = redis
        self.scripts = load_scripts()

    async def load_all(self) -> None:
        redis = self._redis
        await asyncio.gather(*(redis.execute("SCRIPT", "LOAD", s.source) for s in self.scripts.values()))

    async def call(self, name: str, keys: list[str] | tuple[str, ...], args: list[Any] | tuple[Any, ...]) -> Any:
        script = self.scripts[name]
        try:
            return await self._redis.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self._redis.execute("SCRIPT", "LOAD", script.source)
            return await self._redis.execute("EVALSHA", script.sha, len(keys), *keys, *args)

