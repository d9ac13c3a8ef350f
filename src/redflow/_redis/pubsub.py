"""Channel subscriptions over one dedicated connection, shared by every waiter of a process.

A handler receives the message payload, or ``None`` after the connection was re-established: messages
may have been missed while it was down, so the handler must re-read whatever state it waits on.

On a cluster the connection goes to the master holding ``route_key`` (the partition whose scripts
publish these channels): a message published there reaches local subscribers at once, while other
nodes hear it later over the cluster bus, after a subscriber may already have re-read newer state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import weakref
from collections.abc import Callable
from typing import Any

from ..observability.logs import OutageLog
from .client import RedisClient
from .connection import Connection
from .errors import CommandTimeoutError, ConnectionClosedError, RedisError

Handler = Callable[[bytes | None], None]

KEEPALIVE_S = 10.0  # one PING per interval keeps an idle worker within its command budget
KEEPALIVE_DEADLINE_S = 2.0

log = logging.getLogger("redflow.pubsub")


_subscribers: weakref.WeakSet[Subscriber] = weakref.WeakSet()


def _forget_after_fork() -> None:
    for sub in list(_subscribers):
        sub._conn = None
        sub._connecting = None
        sub._handlers = {}
        sub._keepalive = None
        sub._listening = False


os.register_at_fork(after_in_child=_forget_after_fork)


class Subscriber:
    def __init__(self, client: RedisClient, route_key: str | None = None) -> None:
        _subscribers.add(self)
        self._client = client
        self._route_key = route_key
        self._conn: Connection | None = None
        self._connecting: asyncio.Task[Connection] | None = None
        self._handlers: dict[bytes, set[Handler]] = {}
        self._closed = False
        self._node = client  # the server the connection is open to
        self._listening = False
        self._keepalive: asyncio.Future[None] | None = None
        self._checks: set[asyncio.Future[None]] = set()

    async def subscribe(self, channel: bytes, handler: Handler) -> None:
        """Register ``handler``; returns once the server confirmed the subscription."""
        handlers = self._handlers.get(channel)
        if handlers is not None:
            handlers.add(handler)
            return
        self._handlers[channel] = {handler}
        try:
            conn = await self._connection()
            await conn.execute("SUBSCRIBE", channel)
        except BaseException:
            self._discard(channel, handler)
            raise
        self._ensure_keepalive()

    def unsubscribe(self, channel: bytes, handler: Handler) -> None:
        if self._discard(channel, handler) and self._conn is not None and not self._conn.closed:
            fut = self._conn.send(("UNSUBSCRIBE", channel))
            fut.add_done_callback(_ignore_result)

    def _discard(self, channel: bytes, handler: Handler) -> bool:
        handlers = self._handlers.get(channel)
        if handlers is None:
            return False
        handlers.discard(handler)
        if handlers:
            return False
        del self._handlers[channel]
        return True

    async def _connection(self) -> Connection:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        try:
            self._conn = await asyncio.shield(self._connecting)
        finally:
            self._connecting = None
        self._ensure_keepalive()
        return self._conn

    def _ensure_keepalive(self) -> None:
        # The loop ends when the last subscription goes; a later one on the same connection starts it again.
        if not self._closed and (self._keepalive is None or self._keepalive.done()):
            self._keepalive = asyncio.ensure_future(self._keep_alive())

    async def _open(self) -> Connection:
        client = self._client
        node = await client.node_for(self._route_key) if self._route_key is not None else client
        try:
            conn = await node.open_connection(on_push=self._on_push, on_lost=self._on_lost)
        except RedisError:
            client.routes_stale()
            raise
        self._node = node
        if not self._listening:
            client.on_routes_changed(self._check_route)
            self._listening = client.is_cluster
        return conn

    async def _keep_alive(self) -> None:
        """While subscribed: a PING every KEEPALIVE_S that must be
        answered within KEEPALIVE_DEADLINE_S, or the connection is replaced (a frozen or half-open
        node never closes it); on a cluster, also a check that the node still holds ``route_key``
        (else messages would only come late)."""
        while not self._closed and self._handlers:
            await asyncio.sleep(KEEPALIVE_S)
            conn = self._conn
            if conn is None or conn.closed:
                continue
            try:
                async with asyncio.timeout(KEEPALIVE_DEADLINE_S):
                    await conn.execute("PING")
            except TimeoutError:
                # Read the slot map first, so the subscriptions move to the node that holds them now
                # rather than back to the silent one.
                with contextlib.suppress(RedisError):
                    await self._client.refresh_routes()
                conn.abort(CommandTimeoutError(f"no answer to a keepalive PING within {KEEPALIVE_DEADLINE_S}s"))
            except RedisError:
                continue  # the connection is being replaced already
            else:
                await self._check_route_now()

    def _check_route(self) -> None:
        task = asyncio.ensure_future(self._check_route_now())
        self._checks.add(task)  # held until done: the loop keeps only weak references to tasks
        task.add_done_callback(self._checks.discard)

    async def _check_route_now(self) -> None:
        """Move the subscriptions when the node that publishes them is not the one listened to."""
        conn, key = self._conn, self._route_key
        if key is None or conn is None or conn.closed or not self._client.is_cluster:
            return
        try:
            owner = await self._client.node_for(key)
        except RedisError:
            return
        if owner is not self._node and conn is self._conn:
            conn.abort(ConnectionClosedError("the subscribed channels' partition moved to another node"))

    def _on_push(self, message: list[Any]) -> None:
        channel, payload = message[-2], message[-1]
        for handler in list(self._handlers.get(channel, ())):
            handler(payload)

    def _on_lost(self, conn: Connection) -> None:
        if self._closed or conn is not self._conn:
            return
        self._conn = None
        if self._handlers:
            asyncio.get_running_loop().create_task(self._resubscribe())

    async def _resubscribe(self) -> None:
        delay = 0.05
        outage = OutageLog(log, "pub/sub connection")
        while self._handlers and not self._closed:
            try:
                conn = await self._connection()
                channels = list(self._handlers)
                await asyncio.gather(*(conn.execute("SUBSCRIBE", ch) for ch in channels))
            except RedisError as exc:
                outage.failed(exc)  # one line when it starts, a summary while it lasts
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            outage.succeeded()
            for channel in channels:
                for handler in list(self._handlers.get(channel, ())):
                    handler(None)
            return

    async def close(self) -> None:
        self._closed = True
        self._handlers.clear()
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting
        if self._conn is not None:
            self._conn.close()


def _ignore_result(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
