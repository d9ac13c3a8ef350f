"""The Redis client every redflow component uses.

One multiplexed connection carries all ordinary commands of a process (pipelined by
:class:`~redflow._redis.connection.Connection`); blocking commands get a connection of their own
from :meth:`RedisClient.dedicated`. A lost connection fails the commands in flight and is reopened by
the next command, so callers see a ``ConnectionClosedError`` once and then a fresh connection.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

from .connection import Connection, Counters
from .errors import ConnectionClosedError, RedisError


@dataclass(frozen=True, slots=True)
class ServerAddress:
    """Where and how to connect; parsed once from a ``redis://`` or ``rediss://`` URL."""

    host: str = "localhost"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    unix_path: str | None = None

    @classmethod
    def from_url(cls, url: str) -> ServerAddress:
        parsed = urlparse(url)
        if parsed.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"unsupported Redis URL scheme {parsed.scheme!r} in {url!r}")
        username = unquote(parsed.username) if parsed.username else None
        password = unquote(parsed.password) if parsed.password else None
        if parsed.scheme == "unix":
            return cls(unix_path=parsed.path, username=username, password=password)
        db_text = parsed.path.lstrip("/")
        try:
            db = int(db_text) if db_text else 0
        except ValueError:
            raise ValueError(f"invalid database number {db_text!r} in Redis URL {url!r}") from None
        return cls(
            host=parsed.hostname or "localhost",
            port=parsed.port or 6379,
            db=db,
            username=username,
            password=password,
            tls=parsed.scheme == "rediss",
        )

    @classmethod
    def from_redis_py(cls, redis: Any) -> ServerAddress:
        """Read host, port, db and credentials from a redis-py client's connection pool."""
        kwargs: dict[str, Any] = dict(redis.connection_pool.connection_kwargs)
        return cls(
            host=str(kwargs.get("host", "localhost")),
            port=int(kwargs.get("port", 6379)),
            db=int(kwargs.get("db", 0) or 0),
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            tls="ssl_cert_reqs" in kwargs or "ssl_context" in kwargs,
            unix_path=kwargs.get("path"),
        )

    def describe(self) -> str:
        return self.unix_path or f"{self.host}:{self.port}/{self.db}"


DEFAULT_COMMAND_TIMEOUT_S = 10.0


def command_timeout_from_env() -> float:
    """REDFLOW_COMMAND_TIMEOUT_MS: how long a connection may wait for any reply before it is closed."""
    raw = os.environ.get("REDFLOW_COMMAND_TIMEOUT_MS")
    if not raw:
        return DEFAULT_COMMAND_TIMEOUT_S
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"REDFLOW_COMMAND_TIMEOUT_MS must be an integer number of ms, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"REDFLOW_COMMAND_TIMEOUT_MS must be positive, got {value}")
    return value / 1000


def _tune_socket(sock: socket.socket) -> None:
    """No Nagle delay; keepalive probes after 5 s of silence, so a dead peer is noticed in ~11 s."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


_clients: weakref.WeakSet[RedisClient] = weakref.WeakSet()


def _forget_connections_after_fork() -> None:
    # A forked child must not use its parent's sockets or event loop: every client reconnects lazily.
    for client in list(_clients):
        client._conn = None
        client._connecting = None
        client._dedicated = set()


os.register_at_fork(after_in_child=_forget_connections_after_fork)


class RedisClient:
    """Shared, lazily connected, self-healing access to one Redis server."""

    def __init__(
        self, address: ServerAddress, *, connect_timeout_s: float = 5.0, command_timeout_s: float | None = None
    ) -> None:
        _clients.add(self)
        self.address = address
        self.counters = Counters()
        self._connect_timeout_s = connect_timeout_s
        self.command_timeout_s = command_timeout_s if command_timeout_s is not None else command_timeout_from_env()
        self._conn: Connection | None = None
        self._connecting: asyncio.Future[Connection] | None = None
        self._dedicated: set[Connection] = set()
        self._closed = False

    async def open_connection(
        self, on_push: Callable[[list[Any]], None] | None = None,
        on_lost: Callable[[Connection], None] | None = None,
        deadline: bool = True,
    ) -> Connection:
        """Open and authenticate a new connection (not registered as the shared one). Without
        ``deadline`` (blocking commands) the caller bounds its waits itself."""
        if self._closed:
            raise ConnectionClosedError("client is closed")
        loop = asyncio.get_running_loop()
        addr = self.address
        counters = self.counters

        deadline_s = self.command_timeout_s if deadline else None

        def factory() -> Connection:
            return Connection(counters, on_push=on_push, on_lost=on_lost, deadline_s=deadline_s)

        try:
            async with asyncio.timeout(self._connect_timeout_s):
                if addr.unix_path:
                    _, conn = await loop.create_unix_connection(factory, addr.unix_path)
                else:
                    ctx = ssl.create_default_context() if addr.tls else None
                    _, conn = await loop.create_connection(factory, addr.host, addr.port, ssl=ctx)
                    sock = conn._transport.get_extra_info("socket") if conn._transport else None
                    if sock is not None:
                        _tune_socket(sock)
                if addr.password is not None:
                    if addr.username:
                        await conn.execute("AUTH", addr.username, addr.password)
                    else:
                        await conn.execute("AUTH", addr.password)
                if addr.db:
                    await conn.execute("SELECT", addr.db)
        except (OSError, TimeoutError) as exc:
            raise ConnectionClosedError(
                f"cannot connect to Redis at {addr.describe()}: {exc or type(exc).__name__}"
            ) from exc
        except RedisError:
            raise
        return conn

    async def _shared(self) -> Connection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self.open_connection())
            try:
                self._conn = await asyncio.shield(self._connecting)
            finally:
                self._connecting = None
            return self._conn
        return await asyncio.shield(self._connecting)

    async def execute(self, *args: Any) -> Any:
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._shared()
        return await conn.send(args)

    def send_now(self, args: tuple[Any, ...]) -> asyncio.Future[Any] | None:
        """Queue a command on the open shared connection without awaiting; None if not connected."""
        conn = self._conn
        if conn is None or conn.closed:
            return None
        return conn.send(args)

    def drop_shared(self, exc: Exception) -> None:
        """Abandon the shared connection (a deadline passed); the next command opens a new one."""
        conn = self._conn
        if conn is not None and not conn.closed:
            conn.abort(exc)

    async def dedicated(self) -> Connection:
        """A connection of its own, for blocking commands; closed with the client."""
        conn = await self.open_connection(on_lost=self._dedicated.discard, deadline=False)
        self._dedicated.add(conn)
        return conn

    async def close(self) -> None:
        self._closed = True
        if self._conn is not None:
            self._conn.close()
        for conn in list(self._dedicated):
            conn.close()
        self._dedicated.clear()
