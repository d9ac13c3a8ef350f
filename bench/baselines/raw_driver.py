"""The Redis ceiling: ``EVALSHA`` of ``return 1``, one at a time and 16 in flight.

Two clients: a raw blocking socket with hand-encoded RESP (the server and loopback, nearly no client
cost), and redis-py's asyncio client with hiredis (what SAQ, arq and redflow 0.1.9 sit on).
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
from typing import Any
from urllib.parse import urlparse

import _driver_common as common
import redis
import redis.asyncio as aioredis

common.check_outside(redis)
SCRIPT = "return 1"
IN_FLIGHT = 16


def resp(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for p in parts:
        b = p.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class RawConnection:
    def __init__(self, url: str) -> None:
        u = urlparse(url)
        self.sock = socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        if u.password:
            self.call(resp("AUTH", *([u.username] if u.username else []), u.password), 1)

    def call(self, payload: bytes, replies: int) -> None:
        """Send ``payload`` (``replies`` commands) and read that many single-line replies."""
        self.sock.sendall(payload)
        while self.buf.count(b"\r\n") < replies:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk
        lines = self.buf.split(b"\r\n", replies)
        for line in lines[:replies]:
            if line[:1] == b"-":
                raise RuntimeError(line.decode(errors="replace"))
        self.buf = lines[replies]

    def close(self) -> None:
        self.sock.close()


def raw_metrics(args: Any) -> dict[str, float]:
    sha = redis.Redis.from_url(args.url).script_load(SCRIPT)
    conn = RawConnection(args.url)
    one = resp("EVALSHA", sha, "0")
    n = args.serial_n * 5
    try:
        for _ in range(200):
            conn.call(one, 1)
        samples: list[float] = []
        t = time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter()
            conn.call(one, 1)
            samples.append(time.perf_counter() - t0)
        serial = n / (time.perf_counter() - t)
        batch = one * IN_FLIGHT
        rounds = n // IN_FLIGHT
        t = time.perf_counter()
        for _ in range(rounds):
            conn.call(batch, IN_FLIGHT)
        pipelined = rounds * IN_FLIGHT / (time.perf_counter() - t)
    finally:
        conn.close()
    return {
        "evalsha_serial_per_s": serial,
        "evalsha_16_per_s": pipelined,
        "evalsha_p50_ms": statistics.median(samples) * 1000,
    }


async def redispy_metrics(args: Any) -> dict[str, float]:
    r = aioredis.Redis.from_url(args.url, max_connections=IN_FLIGHT + 2)
    sha = await r.script_load(SCRIPT)
    n = args.serial_n * 2
    try:
        for _ in range(100):
            await r.evalsha(sha, 0)
        t = time.perf_counter()
        for _ in range(n):
            await r.evalsha(sha, 0)
        serial = n / (time.perf_counter() - t)

        async def lane(count: int) -> None:
            for _ in range(count):
                await r.evalsha(sha, 0)

        per_lane = n // IN_FLIGHT
        t = time.perf_counter()
        await asyncio.gather(*(lane(per_lane) for _ in range(IN_FLIGHT)))
        in_flight = per_lane * IN_FLIGHT / (time.perf_counter() - t)
    finally:
        await r.aclose()
    return {"redispy_evalsha_serial_per_s": serial, "redispy_evalsha_16_per_s": in_flight}


if __name__ == "__main__":
    args = common.parser(__doc__ or "").parse_args()
    common.run(
        args,
        {"raw": lambda: raw_metrics(args), "redispy": lambda: asyncio.run(redispy_metrics(args))},
        f"EVALSHA 'return 1': raw socket (RESP by hand) and redis-py {redis.__version__} asyncio + hiredis",
    )
