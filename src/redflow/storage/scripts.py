"""Loading of the Lua transitions and calling them by SHA, with key lists built from their headers.

Each ``lua/<name>.lua`` file opens with a header naming its KEYS, ARGV and returns. The loader inlines
``--!include <lib>`` lines from ``lua/lib/``, prepends the return-code table from
:mod:`redflow.storage.codes` and a table ``K`` that names every key of the header (``K.runs`` is
``KEYS[1]`` when the header says ``-- KEYS[1] runs``). A header entry ``-- KEYS[n..] queues`` with an
``-- ARGV[m] queues`` entry gives ``K.queues[name] = {ready, sched, bell}`` for each queue the caller
named; a script that needs a queue it was not given returns ``{C.NEED_QUEUES, name, ...}`` before it
writes anything, and the caller calls again with those queues added.

Python callers name keys too: :meth:`ScriptRunner.run` fills each header key from the keyword of the
same name, or else from the :class:`PartitionKeys` attribute of that name, and refuses a call whose
keys or argument count do not match the header. Scripts are sent with EVALSHA (pipelined like any
other command); on NOSCRIPT (server restarted or flushed) the script is loaded again and the call
retried once.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from .._redis.client import RedisClient
from .._redis.errors import NoScriptError
from ..errors import ConfigurationError
from .codes import Code, lua_prelude
from .keys import PartitionKeys

_INCLUDE = re.compile(r"^--!include (\w+)\s*$", re.MULTILINE)
_KEY_LINE = re.compile(r"^-- KEYS\[(\d+)(\.\.)?\] (\w+)", re.MULTILINE)
_ARG_LINE = re.compile(r"^-- ARGV\[(\d+)(\.\.)?\] (\w+)?", re.MULTILINE)

SCRIPT_NAMES = (
    "enqueue",
    "claim",
    "step",
    "step_many",
    "finish",
    "finish_many",
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
    "handoff_event",
    "handoff_done",
    "start_child_elsewhere",
    "child_ended",
    "cron_fire",
    "resume_input",
    "requeue",
    "replay",
    "admit",
    "debounce",
    "stream_write",
    "enqueue_batch",
    "history",
)

_PARTITION_KEYS = frozenset(PartitionKeys.__slots__)
MAX_QUEUE_ROUNDS = 4  # NEED_QUEUES round trips before a call gives up (each adds every queue asked for)


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str  # as sent to the server
    sha: str
    key_names: tuple[str, ...]  # from the header, KEYS[1] first; a trailing '..' entry is variadic
    variadic_keys: bool
    arg_count: int
    variadic_args: bool
    queue_arg: int  # 1-based ARGV index of the newline-joined queue names, 0 when the script takes none

    @property
    def fixed_keys(self) -> tuple[str, ...]:
        return self.key_names[:-1] if self.variadic_keys else self.key_names


def _read(path: str) -> str:
    return (resources.files("redflow.storage") / "lua" / path).read_text(encoding="utf-8")


def _key_table(key_names: Sequence[str], variadic: bool, queue_arg: int) -> str:
    fixed = key_names[:-1] if variadic else key_names
    fields = ", ".join(f"{name} = KEYS[{i}]" for i, name in enumerate(fixed, 1))
    lua = f"local K = {{{fields}}}\n"
    if queue_arg:
        first = len(fixed) + 1
        lua += (
            f"K.queues = {{}}\ndo\n  local i = {first}\n"
            f"  for name in string.gmatch(ARGV[{queue_arg}], '[^\\n]+') do\n"
            "    K.queues[name] = {ready = KEYS[i], sched = KEYS[i + 1], bell = KEYS[i + 2]}\n"
            "    i = i + 3\n  end\nend\n"
        )
    return lua


_LIB_FUNCTION = re.compile(r"^local function (\w+)\(.*?^end\n", re.MULTILINE | re.DOTALL)
_WORD = re.compile(r"\b\w+\b")


def _with_libraries(raw: str) -> str:
    """The script with its ``--!include``d libraries inlined, keeping only the library functions it
    calls (directly or through other library functions): every function a script defines is created
    again on each call, so a script carries only what it uses. Library functions are
    ``local function`` blocks that end with an ``end`` in the first column; order is kept, as Lua
    needs a local function defined before the code that calls it."""
    libs = [_read(f"lib/{m.group(1)}.lua") for m in _INCLUDE.finditer(raw)]
    own = _INCLUDE.sub("", raw)
    functions = {m.group(1): m.group(0) for lib in libs for m in _LIB_FUNCTION.finditer(lib)}
    needed: set[str] = set()
    todo = [w for w in _WORD.findall(own) if w in functions]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += [w for w in _WORD.findall(functions[name]) if w in functions and w not in needed]
    kept = "".join(
        _LIB_FUNCTION.sub(lambda m: m.group(0) if m.group(1) in needed else "", lib) for lib in libs
    )
    return kept + own


def _parse(name: str) -> Script:
    raw = _read(f"{name}.lua")
    body = _with_libraries(raw)
    keys = _KEY_LINE.findall(raw)
    args = _ARG_LINE.findall(raw)
    variadic_keys = bool(keys and keys[-1][1])
    key_names = tuple(k[2] for k in keys)
    queue_arg = next((int(a[0]) for a in args if a[2] == "queues" and not a[1]), 0)
    if queue_arg and not (variadic_keys and key_names[-1] == "queues"):
        raise RuntimeError(f"{name}.lua: an ARGV 'queues' entry needs a trailing 'KEYS[n..] queues' entry")
    source = lua_prelude() + _key_table(key_names, variadic_keys, queue_arg) + body
    return Script(
        name=name,
        source=source,
        sha=hashlib.sha1(source.encode()).hexdigest(),
        key_names=key_names,
        variadic_keys=variadic_keys,
        arg_count=max((int(a[0]) for a in args), default=0),
        variadic_args=bool(args and args[-1][1]),
        queue_arg=queue_arg,
    )


@cache
def load_scripts() -> dict[str, Script]:
    return {name: _parse(name) for name in SCRIPT_NAMES}


def check_queue_name(queue: str) -> str:
    if not isinstance(queue, str) or not queue.strip() or "\n" in queue:
        raise ConfigurationError(f"queue names must be non-empty strings without newlines, got {queue!r}")
    return queue


class ScriptRunner:
    """Calls scripts on one client; ``load_all`` once at start, NOSCRIPT handled per call."""

    def __init__(self, redis: RedisClient, keys: PartitionKeys | None = None) -> None:
        self._redis = redis
        self._keys = keys
        self.scripts = load_scripts()
        self._templates: dict[str, tuple[list[str | None], dict[str, int]]] = {}

    async def load_all(self, done: set[int] | None = None) -> None:
        """Load every script on the server that holds this runner's partition (on a cluster, its
        master now: a later owner answers NOSCRIPT once and gets the script by EVAL, see ``call``).
        ``done`` holds the nodes (by id) the scripts were loaded on already: partitions that share
        a node load them once."""
        node = await self._redis.node_for(self._keys.base) if self._keys is not None else self._redis
        if done is not None:
            if id(node) in done:
                return
            done.add(id(node))  # before the first await: a sibling preparing meanwhile skips this node
        try:
            await asyncio.gather(*(node.execute("SCRIPT", "LOAD", s.source) for s in self.scripts.values()))
        except BaseException:
            if done is not None:
                done.discard(id(node))
            raise

    def _template(self, script: Script) -> tuple[list[str | None], dict[str, int]]:
        """The script's KEYS with every partition-wide key filled in, and the position of each name;
        computed once per script (the hot path only fills in the per-call keys)."""
        cached = self._templates.get(script.name)
        if cached is None:
            keys = self._keys
            values = [getattr(keys, k, None) if keys is not None and k in _PARTITION_KEYS else None
                      for k in script.fixed_keys]
            cached = self._templates[script.name] = (values, {k: i for i, k in enumerate(script.fixed_keys)})
        return cached

    def key_list(self, script: Script, named: dict[str, str], queues: Sequence[str] = ()) -> list[str]:
        """KEYS for ``script`` in header order; raises when a key is missing or unknown."""
        values, positions = self._template(script)
        out = list(values)
        for key, value in named.items():
            i = positions.get(key)
            if i is None:
                raise TypeError(f"script {script.name!r} has no key {[key]}")
            if not isinstance(value, str):
                raise TypeError(f"script {script.name!r} needs key {key!r}")
            out[i] = value
        if None in out:
            raise TypeError(f"script {script.name!r} needs key {script.fixed_keys[out.index(None)]!r}")
        keys: list[str] = out  # type: ignore[assignment]  # no None left
        if queues:
            if not script.queue_arg or self._keys is None:
                raise TypeError(f"script {script.name!r} takes no queues")
            k = self._keys
            for queue in queues:
                keys += (k.ready(queue), k.scheduled(queue), k.bell(queue))
        return keys

    async def run(
        self, name: str, args: Sequence[Any], *, queues: Sequence[str] = (), extra_keys: Sequence[str] = (),
        **keys: str,
    ) -> Any:
        """Call ``name`` with keys named as in its header. Scripts that take queues are called again
        with every queue a ``NEED_QUEUES`` reply asks for (nothing was written by such a reply)."""
        script = self.scripts[name]
        argv = list(args)
        if not script.variadic_args and len(argv) + (1 if script.queue_arg else 0) != script.arg_count:
            raise TypeError(f"script {name!r} takes {script.arg_count} arguments, got {len(argv)}")
        if not script.queue_arg:
            return await self.call(name, [*self.key_list(script, keys), *extra_keys], argv)
        wanted = list(dict.fromkeys(check_queue_name(q) for q in queues))
        for _ in range(MAX_QUEUE_ROUNDS):
            call_args = [*argv[: script.queue_arg - 1], "\n".join(wanted), *argv[script.queue_arg - 1 :]]
            reply = await self.call(name, self.key_list(script, keys, wanted), call_args)
            if not (isinstance(reply, list) and reply and reply[0] == Code.NEED_QUEUES):
                return reply
            wanted += [q.decode() for q in reply[1:] if q.decode() not in wanted]
        raise RuntimeError(f"script {name!r} kept asking for more queues: {wanted}")

    async def call(self, name: str, keys: list[str] | tuple[str, ...], args: list[Any] | tuple[Any, ...]) -> Any:
        script = self.scripts[name]
        try:
            return await self._redis.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            # EVAL runs the script on the node its keys live on and caches it there for EVALSHA
            # (a restarted, flushed or newly promoted node).
            return await self._redis.execute("EVAL", script.source, len(keys), *keys, *args)
