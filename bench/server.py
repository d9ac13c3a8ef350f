"""The server under test (an embedded Valkey, a given binary, or an existing URL) and INFO helpers."""

from __future__ import annotations

import asyncio
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
    """``used_memory`` right after MEMORY PURGE, once the server has freed what UNLINK handed to its
    background thread (a prefix deleted just before would still be counted otherwise)."""
    for _ in range(200):  # up to ~10 s
        info = parse_info(await redis.execute("INFO", "memory"))
        if int(info.get("lazyfree_pending_objects", "0")) == 0:
            break
        await asyncio.sleep(0.05)
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


# --- CPU per finished run ------------------------------------------------------------------------
SCRIPT_COMMANDS = frozenset({"eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro"})


async def server_cpu_s(redis: RedisClient) -> float:
    """``used_cpu_sys + used_cpu_user`` of the server process (INFO cpu), in seconds."""
    info = parse_info(await redis.execute("INFO", "cpu"))
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def command_stats(redis: RedisClient) -> dict[str, tuple[int, int]]:
    """INFO commandstats as ``{command: (calls, usec)}`` (subcommands as ``client|id``)."""
    stats = parse_info(await redis.execute("INFO", "commandstats"))
    out: dict[str, tuple[int, int]] = {}
    for key, value in stats.items():
        if key.startswith("cmdstat_"):
            fields = dict(part.split("=", 1) for part in value.split(","))
            out[key[len("cmdstat_"):]] = (int(fields["calls"]), int(fields["usec"]))
    return out


def command_usec(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]],
                 direct: dict[str, int], others: dict[str, int] | None = None) -> tuple[float, float]:
    """(server time in the commands a client sent itself, the part of it spent in the commands its scripts
    ran), in microseconds, from two commandstats snapshots.

    Valkey and Redis record the commands a script runs in commandstats too, and a script's own ``usec``
    already includes them, so a plain sum of ``usec`` counts them twice. Of every command this takes the
    share of its calls that the client sent directly (``direct``: its own command counts by name, e.g.
    ``Counters.by_name``): all of EVALSHA's (a script cannot run a script), none of an HSET that only
    scripts ran. The calls neither the client nor ``others`` (a measuring connection's INFO and polls) sent
    ran inside the scripts. ``usec`` is the server's clock around each call, so it includes any time the
    server's thread spent preempted.
    """
    delta: dict[str, tuple[int, int]] = {}
    for name, (calls, usec) in after.items():
        c0, u0 = before.get(name, (0, 0))
        if calls > c0:
            delta[name] = (calls - c0, usec - u0)
    sent = {k.lower(): v for k, v in direct.items()}
    measuring = {k.lower(): v for k, v in (others or {}).items()}
    calls_by_base: dict[str, int] = {}
    for name, (calls, _) in delta.items():
        base = name.split("|", 1)[0]
        calls_by_base[base] = calls_by_base.get(base, 0) + calls
    top = nested = 0.0
    for name, (_, usec) in delta.items():
        base = name.split("|", 1)[0]
        calls = calls_by_base[base]
        own = min(1.0, sent.get(base, 0) / calls)
        top += usec * own
        if base not in SCRIPT_COMMANDS:
            nested += usec * max(0.0, 1.0 - own - measuring.get(base, 0) / calls)
    return top, nested
