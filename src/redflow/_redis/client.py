"""The Redis client every redflow component uses.

One multiplexed connection carries all ordinary commands of a process (pipelined by
:class:`~redflow._redis.connection.Connection`); blocking commands get a connection of their own
from :meth:`RedisClient.dedicated`. A lost connection fails the commands in flight and is reopened by
the next command, so callers see a ``ConnectionClosedError`` once and then a fresh connection.

The first connection asks the server whether it is a Redis Cluster node (``INFO cluster``). If so, the
client routes every command from then on through a :class:`~redflow._redis.cluster.ClusterRouter`:
one such client per master, each pipelined as above. The URL of any one node is enough.
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

from .cluster import ClusterRouter
from .connection import Connection, Counters
from .errors import ConnectError, ConnectionClosedError, RedisError, ResponseError


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
    # A forked child must not use its parent's sockets or event loop: every client reconnects lazily
    # (and a cluster client reads its slot map again).
    for client in list(_clients):
        client._conn = None
        client._connecting = None
        client._dedicated = set()
        client._router = None
        client._detect = not client._is_node


os.register_at_fork(after_in_child=_forget_connections_after_fork)


class RedisClient:
    """Shared, lazily connected, self-healing access to one Redis server."""

    def __init__(
        self, address: ServerAddress, *, connect_timeout_s: float = 5.0, command_timeout_s: float | None = None,
        counters: Counters | None = None, cluster_node: bool = False,
    ) -> None:
        _clients.add(self)
        self.address = address
        self.counters = counters if counters is not None else Counters()
        # A cluster node's own client (made by a router) never routes; any other client checks once.
        self._is_node = cluster_node
        self._detect = not cluster_node
        self._router: ClusterRouter | None = None
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
        *,
        at: Any = None,
    ) -> Connection:
        """Open and authenticate a new connection (not registered as the shared one). Without
        ``deadline`` (blocking commands) the caller bounds its waits itself. On a cluster, to the
        master holding key ``at`` (or, without one, to any master that accepts it)."""
        if self._closed:
            raise ConnectionClosedError("client is closed")
        if at is not None:
            await self._know_mode()
        if self._router is not None:
            if at is None:
                return await self._router.open_any(lambda node: node.open_connection(on_push, on_lost, deadline))
            node = await self._router.node_for(at)
            try:
                return await node.open_connection(on_push, on_lost, deadline)
            except ConnectionClosedError:
                self._router.schedule_refresh()
                raise
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
            raise ConnectError(
                f"cannot connect to Redis at {addr.describe()}: {exc or type(exc).__name__}"
            ) from exc
        except RedisError:
            raise
        return conn

    async def _shared(self) -> Connection | None:
        """The shared connection, opened when needed; None once this client routes over a cluster.

        The connect runs as a task of its own that every caller shares, and its result is adopted
        when it completes even if every caller was cancelled meanwhile (a timed-out heartbeat, a
        lost race of a slot-map refresh), so no opened connection is ever left unowned."""
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        fut = self._connecting
        if fut is None:
            fut = self._connecting = asyncio.ensure_future(self._open_shared())
            fut.add_done_callback(self._adopt)
        conn = await asyncio.shield(fut)
        return None if self._router is not None else conn

    def _adopt(self, fut: asyncio.Future[Connection]) -> None:
        if self._connecting is fut:
            self._connecting = None
        if fut.cancelled() or fut.exception() is not None:
            return  # the exception reaches the callers; retrieved here for the case there are none
        conn = fut.result()
        if self._closed or self._router is not None:
            conn.close()
        elif self._conn is None or self._conn.closed:
            self._conn = conn
        elif self._conn is not conn:
            conn.close()

    async def _open_shared(self) -> Connection:
        conn = await self.open_connection()
        if self._detect:
            try:
                info = await conn.send(("INFO", "cluster"))
            except ResponseError:
                info = b""  # INFO renamed or denied: a managed single server
            self._detect = False
            if b"cluster_enabled:1" in info:
                self._start_routing(conn)
        return conn

    def _start_routing(self, seed: Connection) -> None:
        def make_node(address: ServerAddress) -> RedisClient:
            return RedisClient(
                address, connect_timeout_s=self._connect_timeout_s, command_timeout_s=self.command_timeout_s,
                counters=self.counters, cluster_node=True,
            )

        self._router = ClusterRouter(self.address, make_node)
        seed.close()  # the seed node's own client (made by the router) carries its commands

    @property
    def is_cluster(self) -> bool:
        """Whether commands are routed over a cluster (known after the first command)."""
        return self._router is not None

    async def execute(self, *args: Any) -> Any:
        if self._router is not None:
            return await self._router.execute(args)
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._shared()
            if conn is None:
                return await self._routed(args)
        return await conn.send(args)

    async def _routed(self, args: tuple[Any, ...]) -> Any:
        router = self._router
        assert router is not None
        return await router.execute(args)

    async def _know_mode(self) -> None:
        """Connect once if this client has not yet learnt whether it talks to a cluster."""
        if self._router is None and self._detect:
            await self._shared()

    async def execute_at(self, key: Any, *args: Any) -> Any:
        """Run a keyless command (TIME, INFO, CONFIG ...) on the node that holds ``key``; on one
        server, the same as :meth:`execute`."""
        await self._know_mode()
        if self._router is not None:
            return await self._router.execute(args, key)
        return await self.execute(*args)

    async def node_for(self, key: Any) -> RedisClient:
        """The single-server client that holds ``key`` now: this client itself unless on a cluster."""
        await self._know_mode()
        if self._router is not None:
            return await self._router.node_for(key)
        return self

    async def masters(self) -> list[RedisClient]:
        """One single-server client per master (this client itself unless on a cluster)."""
        await self._know_mode()
        if self._router is not None:
            if not self._router.masters():
                await self._router.refresh()
            return self._router.masters()
        return [self]

    def on_routes_changed(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever the slot map changes (never on a single server): holders of
        connections pinned to a node (blocking waits, subscriptions) check they still hold the
        right one."""
        if self._router is not None:
            self._router.listeners.append(callback)

    async def refresh_routes(self) -> None:
        """On a cluster, read the slot map again now; nothing on a single server."""
        if self._router is not None:
            await self._router.refresh()

    def routes_stale(self) -> None:
        """A node reached outside ``execute`` (a blocking or subscriber connection) failed: on a
        cluster, read the slot map again soon."""
        if self._router is not None:
            self._router.schedule_refresh()

    def send_now(self, args: tuple[Any, ...]) -> asyncio.Future[Any] | None:
        """Queue a command on the open shared connection without awaiting; None if not connected."""
        if self._router is not None:
            return self._router.send_now(args)
        conn = self._conn
        if conn is None or conn.closed:
            return None
        return conn.send(args)

    def drop_shared(self, exc: Exception) -> None:
        """Abandon the shared connection (a deadline passed); the next command opens a new one."""
        if self._router is not None:
            self._router.drop_shared(exc)
            return
        conn = self._conn
        if conn is not None and not conn.closed:
            conn.abort(exc)

    async def dedicated(self) -> Connection:
        """A connection of its own, for blocking commands; closed with the client. On a cluster, use
        ``(await node_for(key)).dedicated()`` for the node of the keys it blocks on."""
        if self._router is not None:
            raise TypeError("on a cluster, a blocking connection belongs to a node: use node_for(key).dedicated()")
        conn = await self.open_connection(on_lost=self._dedicated.discard, deadline=False)
        self._dedicated.add(conn)
        return conn

    async def close(self) -> None:
        self._closed = True
        if self._router is not None:
            await self._router.close()
        if self._conn is not None:
            self._conn.close()
        for conn in list(self._dedicated):
            conn.close()
        self._dedicated.clear()
