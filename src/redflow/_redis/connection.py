"""A pipelined RESP2 connection on asyncio, parsed by hiredis.

Every command issued during one loop tick is written to the socket in a single ``write``: callers
simply ``await conn.execute(...)`` from as many tasks as they like and the connection batches them
(automatic pipelining). Replies are matched to callers in FIFO order, which RESP guarantees.

Invariant: ``_pending`` holds exactly one future per command written (or buffered), in the order the
commands appear on the wire. Deadline: while commands are pending, the server must answer one of them
every ``deadline_s``; otherwise the connection is closed (a half-open socket, a frozen peer) and every
pending command fails with :class:`CommandTimeoutError`, so the next command opens a fresh one.
A subscriber connection additionally receives push messages, which are
recognised by their shape and handed to ``on_push`` instead of consuming a pending future.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import hiredis

from .errors import CommandTimeoutError, ConnectionClosedError, NoScriptError, ResponseError

_PUSH_KINDS = frozenset({b"message", b"pmessage"})


@dataclass(slots=True)
class Counters:
    """Client-side traffic counters shared by every connection of one client."""

    commands: int = 0
    writes: int = 0
    by_name: collections.Counter[str] = field(default_factory=collections.Counter)

    def snapshot(self) -> tuple[int, int]:
        return self.commands, self.writes


class Connection(asyncio.Protocol):
    """One socket to the server; see the module docstring for the pipelining contract."""

    def __init__(
        self,
        counters: Counters,
        on_push: Callable[[list[Any]], None] | None = None,
        on_lost: Callable[[Connection], None] | None = None,
        deadline_s: float | None = None,
    ) -> None:
        self._counters = counters
        self._deadline_s = deadline_s
        self._progress_at = 0.0  # when the server last answered (or the first pending command was sent)
        self._watchdog: asyncio.TimerHandle | None = None
        self._on_push = on_push
        self._on_lost = on_lost
        self._reader = hiredis.Reader()
        self._pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._buffer: list[bytes] = []
        self._flush_scheduled = False
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self.closed = False

    # --- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the Transport interface without subclassing it.
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        pending = self._pending
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:  # pragma: no cover - server bug or corruption
                self._fail_all(ConnectionClosedError(f"protocol error: {exc}"))
                if self._transport is not None:
                    self._transport.close()
                return
            if reply is False:
                return
            self._progress_at = self._loop.time()
            if (
                self._on_push is not None
                and type(reply) is list
                and reply
                and reply[0] in _PUSH_KINDS
            ):
                self._on_push(reply)
                continue
            if not pending:  # pragma: no cover - would mean a desynchronised stream
                continue
            fut = pending.popleft()
            if fut.done():
                continue
            if type(reply) is hiredis.ReplyError:
                fut.set_exception(_reply_error(str(reply)))
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail_all(ConnectionClosedError(f"connection lost: {exc or 'closed by server'}"))
        if self._on_lost is not None:
            self._on_lost(self)

    # --- commands --------------------------------------------------------------------------
    def send(self, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        """Queue one command; it leaves with everything else queued during this tick."""
        fut: asyncio.Future[Any] = self._loop.create_future()
        if self.closed:
            fut.set_exception(ConnectionClosedError("connection is closed"))
            return fut
        self._buffer.append(hiredis.pack_command(args))
        if not self._pending:
            self._progress_at = self._loop.time()
            if self._deadline_s is not None and self._watchdog is None:
                self._watchdog = self._loop.call_later(self._deadline_s, self._check_deadline)
        self._pending.append(fut)
        counters = self._counters
        counters.commands += 1
        counters.by_name[args[0]] += 1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return fut

    async def execute(self, *args: Any) -> Any:
        return await self.send(args)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._buffer or self._transport is None or self.closed:
            return
        data = b"".join(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        self._buffer.clear()
        self._counters.writes += 1
        self._transport.write(data)

    def _check_deadline(self) -> None:
        self._watchdog = None
        if self.closed or not self._pending or self._deadline_s is None:
            return
        silent = self._loop.time() - self._progress_at
        if silent >= self._deadline_s:
            self.abort(CommandTimeoutError(f"no reply from the server for {silent:.1f}s; connection closed"))
            return
        self._watchdog = self._loop.call_later(self._deadline_s - silent, self._check_deadline)

    def close(self) -> None:
        self._shut(ConnectionClosedError("connection closed"), abort=False)

    def abort(self, exc: Exception) -> None:
        """Close the socket at once (no flush to a dead peer) and fail what is pending with ``exc``."""
        self._shut(exc, abort=True)

    def _shut(self, exc: Exception, *, abort: bool) -> None:
        if self._transport is not None and not self.closed:
            if abort:
                self._transport.abort()
            else:
                self._transport.close()
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._fail_all(exc)

    def _fail_all(self, exc: Exception) -> None:
        self._buffer.clear()
        while self._pending:
            fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(exc)


def _reply_error(message: str) -> ResponseError:
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    return ResponseError(message)
