"""Redis Cluster routing for :class:`~redflow._redis.client.RedisClient`.

A cluster client keeps one pipelined, self-healing client per master (so automatic pipelining still
batches every command a loop tick issues, per node) and a slot map read with ``CLUSTER SLOTS``. A
command goes to the master of its first key's hash slot. Keyless commands go to a node the caller
names by key (``execute_at``) or to any master.

Redirections: ``MOVED`` updates that slot at once, schedules a full map refresh and sends the command
again; ``ASK`` sends ``ASKING`` and the command back to back on the target's connection. Both mean the
command did not run, so resending is safe. ``TRYAGAIN``, ``CLUSTERDOWN`` and a connection that could
not be opened (nothing was sent) are retried for up to ``BUSY_BUDGET_S``, reading the map again, then
raised as :class:`ClusterUnavailableError` or the connect error (connection errors: the command did
not run and the caller treats it as an outage). A connection lost with the command on it schedules a
refresh and is raised as is: the command may have run, so it is never resent here. Listeners hear of
every change of the map, so connections pinned to a node (blocking waits, subscriptions) move with it.

redis-py's cluster client is not used because it sends each command on a pooled connection and waits
for its reply before the connection carries another, so concurrent commands never share a write.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .errors import ConnectError, ConnectionClosedError, RedisError, ResponseError

if TYPE_CHECKING:
    from .client import RedisClient, ServerAddress
    from .connection import Connection

log = logging.getLogger("redflow.redis")

SLOTS = 16384
MAX_REDIRECTS = 8  # MOVED and ASK answers one command may follow
BUSY_BUDGET_S = 10.0  # how long a command waits out TRYAGAIN, CLUSTERDOWN or an unreachable owner
BUSY_RETRY_MAX_S = 1.0
REFRESH_MIN_INTERVAL_S = 0.2  # background refreshes after a redirection or a lost node, at most this often
BUSY_RETRY_S = 0.05  # first pause after TRYAGAIN or CLUSTERDOWN; doubles each time


class ClusterUnavailableError(ConnectionClosedError):
    """No master serves the slot now (failover or resharding in progress); the command did not run."""


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC16/XMODEM, the checksum Redis Cluster hashes keys with."""
    crc = 0
    table = _CRC16
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[((crc >> 8) ^ byte) & 0xFF]
    return crc


_slot_cache: dict[str | bytes, int] = {}


def key_slot(key: str | bytes) -> int:
    """The hash slot of ``key``: of its hash tag (the text inside the first ``{...}`` when not empty),
    else of the whole key. Slots of tags are cached (redflow keys carry one of few tags)."""
    raw = key.encode() if isinstance(key, str) else key
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            tag = raw[start + 1 : end]
            slot = _slot_cache.get(tag)
            if slot is None:
                if len(_slot_cache) > 10_000:
                    _slot_cache.clear()
                slot = _slot_cache[tag] = crc16(tag) % SLOTS
            return slot
    return crc16(raw) % SLOTS


# Commands without a key (or whose first argument is not one).
_KEYLESS = frozenset({
    "TIME", "PING", "INFO", "CONFIG", "CLIENT", "SCRIPT", "CLUSTER", "PUBLISH", "SCAN", "DBSIZE",
    "KEYS", "FLUSHALL", "FLUSHDB", "DEBUG", "ECHO", "COMMAND", "LATENCY", "SLOWLOG", "WAIT", "ROLE",
    "LASTSAVE", "BGSAVE", "BGREWRITEAOF", "MULTI", "EXEC", "ASKING", "READONLY", "FUNCTION", "MEMORY",
})
_SCRIPT_CALLS = frozenset({"EVALSHA", "EVAL", "EVALSHA_RO", "EVAL_RO", "FCALL", "FCALL_RO"})


def _name(arg: Any) -> str:
    return (arg.decode() if isinstance(arg, bytes) else str(arg)).upper()


def command_key(args: Sequence[Any]) -> Any:
    """The key a command is routed by, or None for a keyless command."""
    name = _name(args[0])
    if name in _SCRIPT_CALLS:
        return args[3] if len(args) > 3 and int(args[2]) > 0 else None
    if name in ("XREAD", "XREADGROUP"):
        for i, arg in enumerate(args):
            if _name(arg) == "STREAMS":
                return args[i + 1] if i + 1 < len(args) else None
        return None
    if name in ("OBJECT", "XINFO") or (name == "MEMORY" and len(args) > 2 and _name(args[1]) == "USAGE"):
        return args[2] if len(args) > 2 else None
    if name in _KEYLESS or len(args) < 2:
        return None
    return args[1]


def _redirect_target(message: str) -> tuple[int, str, int]:
    """(slot, host, port) of a ``MOVED``/``ASK`` reply: ``MOVED 3999 127.0.0.1:6381``."""
    _, slot, where = message.split(" ", 2)
    host, _, port = where.rpartition(":")
    return int(slot), host, int(port)


class ClusterRouter:
    """The slot map and the per-master clients of one cluster; see the module docstring."""

    def __init__(self, seed: ServerAddress, make_node: Callable[[ServerAddress], RedisClient]) -> None:
        self._seed = seed
        self._make_node = make_node
        self._nodes: dict[tuple[str, int], RedisClient] = {}
        self._slots: list[RedisClient | None] = [None] * SLOTS
        self._refreshing: asyncio.Future[None] | None = None
        self._refresh_handle: asyncio.TimerHandle | None = None
        self._refreshed_at = 0.0
        self._closed = False
        self.listeners: list[Callable[[], None]] = []  # called when the slot map changes

    # --- slot map ------------------------------------------------------------------------------------
    def _node(self, host: str, port: int) -> RedisClient:
        node = self._nodes.get((host, port))
        if node is None:
            node = self._nodes[(host, port)] = self._make_node(replace(self._seed, host=host, port=port, db=0))
        return node

    def masters(self) -> list[RedisClient]:
        """The distinct masters of the current slot map, in slot order."""
        seen: dict[int, RedisClient] = {}
        for node in self._slots:
            if node is not None:
                seen.setdefault(id(node), node)
        return list(seen.values())

    async def refresh(self) -> None:
        """Read the slot map again (one refresh at a time; concurrent callers share it)."""
        if self._refreshing is None:
            self._refreshing = asyncio.ensure_future(self._refresh())
        fut = self._refreshing
        try:
            await asyncio.shield(fut)
        finally:
            if fut.done() and self._refreshing is fut:
                self._refreshing = None

    async def _refresh(self) -> None:
        # Every known node is asked at once and the first answer wins: a frozen or unreachable node
        # (often the very master whose loss triggered the refresh) must not hold the map back.
        candidates: dict[int, RedisClient] = {}
        for node in [*self.masters(), *self._nodes.values(), self._node(self._seed.host, self._seed.port)]:
            candidates.setdefault(id(node), node)
        asks = {asyncio.ensure_future(node.execute("CLUSTER", "SLOTS")): node for node in candidates.values()}
        errors: list[str] = []
        pending = set(asks)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    exc = fut.exception()
                    if exc is None:
                        self._apply(fut.result(), asks[fut])
                        self._refreshed_at = asyncio.get_running_loop().time()
                        return
                    errors.append(f"{asks[fut].address.describe()}: {exc}")
        finally:
            for fut in asks:
                if fut.done():
                    if not fut.cancelled():
                        fut.exception()  # retrieved: a failed ask beside the winner is not an error
                else:
                    fut.cancel()
        raise ClusterUnavailableError("no cluster node answered CLUSTER SLOTS: " + "; ".join(errors))

    def _apply(self, reply: list[Any], answered_by: RedisClient) -> None:
        slots: list[RedisClient | None] = [None] * SLOTS
        for entry in reply:
            start, end, master = int(entry[0]), int(entry[1]), entry[2]
            host = master[0].decode() if master[0] else ""
            # An empty or '?' host means "the address you reached me on".
            if host in ("", "?"):
                host = answered_by.address.host
            node = self._node(host, int(master[1]))
            for slot in range(start, end + 1):
                slots[slot] = node
        changed = slots != self._slots
        self._slots = slots
        if changed:
            self._changed()

    def _changed(self) -> None:
        for callback in list(self.listeners):
            try:
                callback()
            except Exception:  # a listener's bug must not break routing
                log.exception("cluster route listener failed")

    def schedule_refresh(self) -> None:
        """Refresh soon in the background, at most every REFRESH_MIN_INTERVAL_S."""
        if self._closed or self._refresh_handle is not None or self._refreshing is not None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, self._refreshed_at + REFRESH_MIN_INTERVAL_S - loop.time())
        self._refresh_handle = loop.call_later(delay, self._start_background_refresh)

    def _start_background_refresh(self) -> None:
        self._refresh_handle = None
        if self._closed:
            return
        task = asyncio.ensure_future(self.refresh())
        task.add_done_callback(_log_refresh_failure)

    async def node_for(self, key: Any) -> RedisClient:
        """The master of ``key``'s slot (any master for None), reading the map when it has none."""
        node = self._slots[key_slot(key)] if key is not None else self._any()
        if node is None:
            await self.refresh()
            node = self._slots[key_slot(key)] if key is not None else self._any()
            if node is None:
                where = "any slot" if key is None else f"slot {key_slot(key)}"
                raise ClusterUnavailableError(f"no cluster master serves {where}")
        return node

    def _any(self) -> RedisClient | None:
        return next((n for n in self._slots if n is not None), None)

    # --- commands ------------------------------------------------------------------------------------
    async def execute(self, args: tuple[Any, ...], key: Any = None) -> Any:
        if key is None:
            key = command_key(args)
            if key is None and _name(args[0]) == "KEYS":
                return await self._keys_everywhere(args)
        pause, busy_s, redirects = BUSY_RETRY_S, 0.0, 0
        asking: RedisClient | None = None
        while True:
            node = asking or await self.node_for(key)
            try:
                if asking is not None:
                    asking = None
                    return await _execute_asking(node, args)
                return await node.execute(*args)
            except ResponseError as exc:
                message = str(exc)
                if message.startswith(("MOVED ", "ASK ")):
                    redirects += 1
                    if redirects > MAX_REDIRECTS:
                        raise ClusterUnavailableError(
                            f"{_name(args[0])} was redirected {MAX_REDIRECTS} times; the cluster is unsettled"
                        ) from exc
                    slot, host, port = _redirect_target(message)
                    if message.startswith("MOVED "):
                        self._slots[slot] = self._node(host, port)
                        self._changed()
                        self.schedule_refresh()
                    else:
                        asking = self._node(host, port)
                    continue
                if message.startswith(("TRYAGAIN", "CLUSTERDOWN")):
                    # A slot half-way through a move, or a failover not decided yet: it passes.
                    if busy_s >= BUSY_BUDGET_S:
                        raise ClusterUnavailableError(
                            f"{_name(args[0])}: the cluster kept answering {message.split()[0]} for "
                            f"{busy_s:.1f}s ({message})"
                        ) from exc
                    self.schedule_refresh()
                    await asyncio.sleep(pause)
                    busy_s += pause
                    pause = min(pause * 2, BUSY_RETRY_MAX_S)
                    continue
                raise
            except ConnectError:
                # Nothing was sent, so nothing ran: read the map again and retry on its owner (a
                # failover may be over), as long as the busy budget lasts.
                if busy_s >= BUSY_BUDGET_S:
                    raise
                await self._refresh_quietly()
                await asyncio.sleep(pause)
                busy_s += pause
                pause = min(pause * 2, BUSY_RETRY_MAX_S)
                continue
            except ConnectionClosedError:
                self.schedule_refresh()
                raise

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except RedisError:
            pass  # the command's own retry reports the outage

    async def _keys_everywhere(self, args: tuple[Any, ...]) -> list[Any]:
        """KEYS on every master, merged (a debugging aid, as on one server)."""
        if self._any() is None:
            await self.refresh()
        replies = await asyncio.gather(*(node.execute(*args) for node in self.masters()))
        return [key for reply in replies for key in reply]

    def send_now(self, args: tuple[Any, ...]) -> asyncio.Future[Any] | None:
        key = command_key(args)
        node = self._slots[key_slot(key)] if key is not None else self._any()
        return None if node is None else node.send_now(args)

    async def open_any(self, open_on: Callable[[RedisClient], Any]) -> Connection:
        """A connection to the first master that accepts one (pub/sub: any node hears every message)."""
        if self._any() is None:
            await self.refresh()
        errors: list[str] = []
        for node in [*self.masters(), self._node(self._seed.host, self._seed.port)]:
            try:
                conn: Connection = await open_on(node)
                return conn
            except ConnectionClosedError as exc:
                errors.append(str(exc))
        self.schedule_refresh()
        raise ClusterUnavailableError("no cluster node accepted a connection: " + "; ".join(errors))

    def drop_shared(self, exc: Exception) -> None:
        for node in self._nodes.values():
            node.drop_shared(exc)
        self.schedule_refresh()  # a deadline passed: the node may be gone for good (a failover)

    async def close(self) -> None:
        self._closed = True
        if self._refresh_handle is not None:
            self._refresh_handle.cancel()
            self._refresh_handle = None
        await asyncio.gather(*(node.close() for node in self._nodes.values()))


async def _execute_asking(node: RedisClient, args: tuple[Any, ...]) -> Any:
    """ASKING and the command, back to back on the node's shared connection (one write)."""
    await node.execute("PING")  # opens the connection when needed, so both commands share it
    asking = node.send_now(("ASKING",))
    command = node.send_now(args)
    if asking is None or command is None:
        raise ConnectionClosedError(f"connection to {node.address.describe()} lost during ASK redirection")
    try:
        await asking
    except ResponseError:
        pass  # the command's own reply says what happened
    return await command


def _log_refresh_failure(task: asyncio.Future[None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.debug("cluster slot map refresh failed: %s", exc)
