"""A fault-injecting TCP proxy for tests: put it between redflow and the server, then break things.

Faults act on the connections open when they are injected: ``freeze`` stops forwarding in both
directions but keeps the sockets open (a half-open peer: no RST, no FIN), ``drop_replies`` discards
what the server sends (requests still arrive, so writes apply and their replies are lost), ``cut``
closes every connection, ``latency`` delays each chunk. New connections are forwarded normally
unless ``refuse`` is set, so a client that reconnects gets through.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass
class _Pair:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    frozen: bool = False
    drop_replies: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.pairs: list[_Pair] = []
        self.latency_s = 0.0
        self.refuse = False
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        if self._server is not None:
            await self._server.wait_closed()

    # --- faults ------------------------------------------------------------------------------------
    def freeze(self) -> int:
        """Stop forwarding on every open connection (they stay open); returns how many."""
        for pair in self.pairs:
            pair.frozen = True
        return len(self.pairs)

    def drop_replies(self) -> int:
        for pair in self.pairs:
            pair.drop_replies = True
        return len(self.pairs)

    def cut(self) -> int:
        n = len(self.pairs)
        for pair in self.pairs:
            for writer in (pair.client, pair.server):
                with contextlib.suppress(Exception):
                    writer.transport.abort()
            for task in pair.tasks:
                task.cancel()
        self.pairs.clear()
        return n

    # --- plumbing ----------------------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        pair = _Pair(client=writer, server=up_writer)
        self.pairs.append(pair)
        pair.tasks = [
            asyncio.ensure_future(self._pump(pair, reader, up_writer, replies=False)),
            asyncio.ensure_future(self._pump(pair, up_reader, writer, replies=True)),
        ]

    async def _pump(self, pair: _Pair, src: asyncio.StreamReader, dst: asyncio.StreamWriter, replies: bool) -> None:
        held: list[bytes] = []
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                if self.latency_s:
                    await asyncio.sleep(self.latency_s)
                if pair.frozen:
                    held.append(data)  # never delivered: the peer looks alive but silent
                    continue
                if replies and pair.drop_replies:
                    continue
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            if not pair.frozen:
                with contextlib.suppress(Exception):
                    dst.close()
