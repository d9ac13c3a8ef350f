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
from .errors import RedisError

Handler = Callable[[bytes | None], None]

log = logging.getLogger("redflow.pubsub")


_subscribers: weakref.WeakSet[Subscriber] = weakref.WeakSet()


def _forget_after_fork() -> None:
    for sub in list(_subscribers):
        sub._conn = None
        sub._connecting = None
        sub._handlers = {}


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
            self._connecting = asyncio.ensure_future(
                self._client.open_connection(on_push=self._on_push, on_lost=self._on_lost, at=self._route_key)
            )
        try:
            self._conn = await asyncio.shield(self._connecting)
        finally:
            self._connecting = None
        return self._conn

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
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting
        if self._conn is not None:
            self._conn.close()


def _ignore_result(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
