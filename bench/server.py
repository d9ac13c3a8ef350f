"""The server under test (an embedded Valkey, a given binary, or an existing URL) and INFO helpers."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from redflow._redis.client import RedisClient, ServerAddress
from redflow.embedded import EmbeddedServer


class BenchServer:
    """Starts a server unless ``url`` is given; an existing server is never flushed."""

    def __init__(self, url: str | None = None, binary: str | None = None) -> None:
        self.given_url = url
        self.binary = binary
        self.server: EmbeddedServer | None = None

    def __enter__(self) -> BenchServer:
        if self.given_url is None:
            binary = Path(self.binary) if self.binary else None
            self.server = EmbeddedServer(binary, appendonly=False).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.stop()

    @property
    def url(self) -> str:
        if self.given_url is not None:
            return self.given_url
        assert self.server is not None
        return self.server.url

    @property
    def owned(self) -> bool:
        return self.server is not None

    def describe(self) -> str:
        if self.server is not None:
            return f"started by the harness: {self.server.binary} (appendonly no)"
        return f"existing server at {self.given_url}"


def new_prefix(kind: str) -> str:
    return f"rfbench:{kind}:{uuid.uuid4().hex[:10]}"


def connect(url: str) -> RedisClient:
    return RedisClient(ServerAddress.from_url(url))


def parse_info(raw: Any) -> dict[str, str]:
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and ":" in line:
            key, _, value = line.partition(":")
            out[key] = value
    return out


async def total_commands(redis: RedisClient) -> int:
    """Sum of ``calls`` over INFO commandstats (commands run inside scripts included)."""
    stats = parse_info(await redis.execute("INFO", "commandstats"))
    return sum(int(v.split("calls=")[1].split(",")[0]) for k, v in stats.items() if k.startswith("cmdstat_"))


async def used_memory(redis: RedisClient) -> int:
    """``used_memory`` right after MEMORY PURGE."""
    await redis.execute("MEMORY", "PURGE")
    return int(parse_info(await redis.execute("INFO", "memory"))["used_memory"])


async def server_version(redis: RedisClient) -> str:
    info = parse_info(await redis.execute("INFO", "server"))
    if "valkey_version" in info:
        return f"Valkey {info['valkey_version']}"
    return f"Redis {info.get('redis_version', '?')}"


async def delete_prefix(redis: RedisClient, prefix: str) -> int:
    """UNLINK every key under ``prefix`` (SCAN, so it is safe on a shared server)."""
    cursor = b"0"
    deleted = 0
    while True:
        cursor, keys = await redis.execute("SCAN", cursor, "MATCH", f"{prefix}:*", "COUNT", 1000)
        if keys:
            deleted += int(await redis.execute("UNLINK", *keys))
        if cursor in (b"0", 0, "0"):
            return deleted
