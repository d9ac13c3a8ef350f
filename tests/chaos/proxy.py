"""A fault-injecting TCP proxy for tests: put it between redflow and the server, then break things.

Faults act on the connections open when they are injected: ``freeze`` stops forwarding in both
directions but keeps the sockets open (a half-open peer: no RST, no FIN), ``drop_replies`` discards
what the server sends (requests still arrive, so writes apply and their replies are lost), ``cut``
closes every connection. Two settings act on every connection, open or new: ``set_latency`` delays
each chunk in each direction (order kept, throughput not capped: a delay line, not a slow pipe), and
``blackhole`` accepts new connections and never forwards or closes them (a connect succeeds, then
the peer stays silent forever, like a load balancer whose backend is gone; ``spare`` exempts the
connections whose first bytes it accepts). ``half_open`` freezes the open connections and detaches
them, so no later ``cut`` closes them either. New connections are forwarded normally unless
``refuse`` or ``blackhole`` is set, so a client that reconnects gets through. ``retarget`` points
new connections at another server (a failover behind one address).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class _Pair:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    frozen: bool = False
    drop_replies: bool = False
    holding: bool = False  # replies are kept, in order, until release_replies
    held_replies: list[bytes] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int, *, seed: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.pairs: list[_Pair] = []
        self.latency_s = 0.0  # fixed part of the delay per chunk and direction
        self.jitter_s = 0.0  # plus a uniform random part in [0, jitter_s)
        self.refuse = False
        self.blackhole = False
        self.accepted = 0  # connections forwarded upstream
        self.blackholed: list[asyncio.StreamWriter] = []  # connections accepted and left silent
        self.spare: Callable[[bytes], bool] | None = None  # blackhole exemption, by a connection's first bytes
        self.spared = 0
        self.detached: list[_Pair] = []  # frozen by half_open: never closed until close()
        self._rng = random.Random(seed)
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
        _abort(self.detached)
        self.detached.clear()
        self.release_blackholed()
        if self._server is not None:
            await self._server.wait_closed()

    # --- faults ------------------------------------------------------------------------------------
    def freeze(self) -> int:
        """Stop forwarding on every open connection (they stay open); returns how many."""
        for pair in self.pairs:
            pair.frozen = True
        return len(self.pairs)

    def half_open(self) -> int:
        """Freeze every open connection and keep it open for good (no cut closes it); returns how many."""
        n = self.freeze()
        self.detached += self.pairs
        self.pairs = []
        return n

    def hold_replies(self) -> int:
        """Keep every reply of the open connections (requests still go through) until
        ``release_replies``: the server works on, its answers wait; returns how many connections."""
        for pair in self.pairs:
            pair.holding = True
        return len(self.pairs)

    def release_replies(self) -> int:
        """Deliver the replies ``hold_replies`` kept, in order, and forward again; returns how many."""
        n = 0
        for pair in self.pairs:
            pair.holding = False
            for data in pair.held_replies:
                if not pair.client.is_closing():
                    pair.client.write(data)
                    n += 1
            pair.held_replies.clear()
        return n

    def drop_replies(self) -> int:
        for pair in self.pairs:
            pair.drop_replies = True
        return len(self.pairs)

    def cut(self) -> int:
        n = len(self.pairs)
        _abort(self.pairs)
        self.pairs.clear()
        return n

    def set_latency(self, latency_s: float, jitter_s: float = 0.0) -> None:
        self.latency_s, self.jitter_s = latency_s, jitter_s

    def retarget(self, host: str, port: int) -> None:
        """New connections go to ``host:port``; open ones keep their server."""
        self.upstream = (host, port)

    def release_blackholed(self) -> int:
        """Close the connections ``blackhole`` accepted (a test's cleanup; the fault never does)."""
        n = len(self.blackholed)
        for writer in self.blackholed:
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self.blackholed.clear()
        return n

    # --- plumbing ----------------------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.transport.abort()
            return
        first = b""
        if self.blackhole:
            self.blackholed.append(writer)  # answer nothing, close nothing ...
            spare = self.spare
            if spare is None:
                return
            with contextlib.suppress(OSError):
                first = await reader.read(65536)
            if not (first and spare(first)) or writer not in self.blackholed:
                return
            self.blackholed.remove(writer)  # ... unless spared: forwarded like any other
            self.spared += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        if first:
            up_writer.write(first)
        self.accepted += 1
        pair = _Pair(client=writer, server=up_writer)
        self.pairs.append(pair)
        pair.tasks = [
            asyncio.ensure_future(self._pump(pair, reader, up_writer, replies=False)),
            asyncio.ensure_future(self._pump(pair, up_reader, writer, replies=True)),
        ]

    def _delay(self) -> float:
        if not self.latency_s and not self.jitter_s:
            return 0.0
        return self.latency_s + self._rng.random() * self.jitter_s

    async def _pump(self, pair: _Pair, src: asyncio.StreamReader, dst: asyncio.StreamWriter, replies: bool) -> None:
        loop = asyncio.get_running_loop()
        held: list[bytes] = []
        line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()  # the delay line: (due time, chunk)
        in_line = 0  # chunks put on the line and not yet delivered (one may be out of the queue, waiting)
        last_due = 0.0

        def deliver(data: bytes) -> None:
            if pair.frozen:
                held.append(data)  # never delivered: the peer looks alive but silent
            elif replies and pair.holding:
                pair.held_replies.append(data)
            elif not (replies and pair.drop_replies) and not dst.is_closing():
                dst.write(data)

        async def drain_line() -> None:
            nonlocal in_line
            while True:
                due, data = await line.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                deliver(data)
                in_line -= 1
                line.task_done()

        sender = asyncio.ensure_future(drain_line())
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                delay = self._delay()
                if delay or in_line:  # chunks never overtake each other (TCP does not reorder)
                    last_due = max(loop.time() + delay, last_due)
                    in_line += 1
                    line.put_nowait((last_due, data))
                    continue
                deliver(data)
                await dst.drain()
            await line.join()  # what was in flight arrives before the end of stream
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            sender.cancel()
            if not pair.frozen:
                with contextlib.suppress(Exception):
                    dst.close()


def _abort(pairs: list[_Pair]) -> None:
    for pair in pairs:
        for writer in (pair.client, pair.server):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        for task in pair.tasks:
            task.cancel()
