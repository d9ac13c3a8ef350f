"""A worker's blocking wait for work: BRPOP on its queues' bell lists, on a connection of its own."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from .._redis.client import RedisClient
from .._redis.connection import Connection
from .._redis.errors import CommandTimeoutError, ConnectionClosedError, ResponseError
from .keys import PartitionKeys

log = logging.getLogger("redflow.worker")


class BellWaiter:
    """Blocks until a bell of ``queues`` rings, or a timeout. A server checks blocking timeouts only
    on its cron tick (100 ms at the default hz), so a wait shorter than ``block_s`` is not left to
    BRPOP's timeout: a local timer unblocks it (CLIENT UNBLOCK) on time."""

    def __init__(self, redis: RedisClient, keys: PartitionKeys, queues: Sequence[str]) -> None:
        self._redis = redis
        self._bells = [keys.bell(q) for q in queues]
        self._conn: Connection | None = None
        self._node = redis  # the server the blocking connection is open to
        self._listening = False
        self._checks: set[asyncio.Task[RedisClient]] = set()
        self._client_id = 0
        self._closed = False

    async def _connection(self) -> Connection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        # A dedicated connection has no reply deadline of its own (BRPOP blocks): one that opens but
        # never answers (half-open) must not hang the claim loop.
        deadline = self._redis.command_timeout_s
        fresh: Connection | None = None
        try:
            async with asyncio.timeout(deadline):
                # The bells share one hash tag: on a cluster, one node holds them all.
                self._node = await self._redis.node_for(self._bells[0])
                if not self._listening:
                    self._redis.on_routes_changed(self._check_route)
                    self._listening = True
                fresh = await self._node.dedicated()
                self._client_id = int(await fresh.execute("CLIENT", "ID"))
        except TimeoutError:
            if fresh is not None:
                fresh.abort(CommandTimeoutError(f"no reply to CLIENT ID within {deadline:.1f}s"))
            self._redis.routes_stale()
            raise CommandTimeoutError(f"opening the blocking connection took over {deadline:.1f}s") from None
        except ConnectionClosedError:
            self._redis.routes_stale()
            raise
        self._conn = fresh
        return fresh

    async def wait(self, timeout_s: float, block_s: float, watchdog_s: float, who: str) -> None:
        """Wait up to ``timeout_s`` for a bell (each BRPOP lasts ``block_s`` at most); a wait that
        outlives ``watchdog_s`` reopens the connection."""
        conn = await self._connection()
        if self._closed:  # closed while the connection opened
            conn.close()
            return
        timer = None
        if timeout_s < block_s:
            timer = asyncio.get_running_loop().call_later(timeout_s, self._unblock, self._client_id)
        try:
            async with asyncio.timeout(watchdog_s):
                await conn.execute("BRPOP", *self._bells, f"{block_s:.3f}")
        except TimeoutError:
            log.warning("%s: blocking wait exceeded %.1fs; reopening its connection", who, watchdog_s)
            conn.close()
            self._redis.routes_stale()
        except ResponseError:
            # MOVED or UNBLOCKED: on a cluster the node no longer holds the bells (a failover); the
            # next wait opens a connection to the node that does.
            conn.close()
            self._redis.routes_stale()
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _check_route(self) -> None:
        """The slot map changed: a wait on a node that no longer holds the bells ends now (the next
        one opens on the new owner) rather than at the watchdog."""
        conn = self._conn
        if conn is None or conn.closed:
            return
        task = asyncio.ensure_future(self._redis.node_for(self._bells[0]))

        def moved(fut: asyncio.Task[RedisClient]) -> None:
            if not fut.cancelled() and fut.exception() is None and fut.result() is not self._node:
                conn.abort(ConnectionClosedError("the bells moved to another cluster node"))

        task.add_done_callback(moved)
        self._checks.add(task)  # held until done: the loop keeps only weak references to tasks
        task.add_done_callback(self._checks.discard)

    def _unblock(self, client_id: int) -> None:
        fut = self._node.send_now(("CLIENT", "UNBLOCK", client_id))
        if fut is not None:  # a failure only means the wait ends at BRPOP's own timeout
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())

    def drop(self, exc: Exception) -> None:
        """Abandon the blocking connection (its server looks unreachable): a wait in progress fails
        with ``exc`` and the next one opens a fresh connection."""
        conn = self._conn
        if conn is not None and not conn.closed:
            conn.abort(exc)

    def close(self) -> None:
        self._closed = True
        if self._conn is not None:
            self._conn.close()
