"""Review of claim.lua's unclaimable runs: a claim must lose nothing and leave the running counts,
held set and mutex holders consistent when some runs of its batch raise, when a key the batched
writes touch has the wrong type, and when a poison run sits in a queue that keeps moving."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
import logging
from typing import Any

import msgspec
import pytest
from redflow._redis.errors import ResponseError

from redflow import RedflowClient, WorkflowHandlerContext, WorkflowRegistry, define_workflow
from redflow.storage.store import Store

from ..batch_helpers import claim_batch, noop
from ..conftest import WorkerFactory, wait_until
from ..partitioned import keys_of

pytestmark = pytest.mark.usefixtures("one_partition")

LONG = 600_000
DAMAGED = b"\xc1"  # not MessagePack


async def _echo(ctx: WorkflowHandlerContext) -> Any:
    return ctx.input


async def _store(client: RedflowClient) -> Store:
    await client.store.ensure_ready()
    store = client.store.at(0)
    await store.heartbeat("w", LONG, LONG, False)
    return store


async def _headers(store: Store) -> dict[str, dict[str, Any]]:
    raw = await store.redis.execute("HGETALL", store.keys.runs)
    out = {}
    for i in range(0, len(raw), 2):
        try:
            out[raw[i].decode()] = msgspec.msgpack.decode(raw[i + 1])
        except msgspec.DecodeError:
            pass
    return out


async def consistent(store: Store) -> None:
    """Running counts match the running headers; every held member names a run holding it; every
    mutex holder is running; index members of queued runs name queued runs."""
    k = store.keys
    headers = await _headers(store)
    counts: dict[str, int] = {}
    for h in headers.values():
        if h["s"] == "running":
            counts[h["w"]] = counts.get(h["w"], 0) + 1
    raw = await store.redis.execute("HGETALL", k.running)
    running = {raw[i].decode(): int(raw[i + 1]) for i in range(0, len(raw), 2)}
    assert running == counts, (running, counts)
    for member in await store.redis.execute("ZRANGE", k.held, 0, -1):
        rid = member.decode().rsplit(":", 1)[1]
        assert headers[rid].get("hd") == member.decode() or headers[rid].get("tq") == member.decode(), member
    raw = await store.redis.execute("HGETALL", k.mutexes)
    for i in range(0, len(raw), 2):
        assert headers[raw[i + 1].decode()]["s"] == "running", raw
    for member in await store.redis.execute("ZRANGE", k.index, 0, -1):
        parts = member.decode().split(":")
        if parts[0] == "s" and parts[1] in headers.get(parts[2], {"s": parts[1]})["s"]:
            continue
        if parts[0] == "s":
            raise AssertionError(f"{member!r}: run is {headers[parts[2]]['s']}")


async def test_mixed_batch_keeps_counts_holds_and_inputs_aligned(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    plain = define_workflow("rc-plain", handler=noop, registry=registry)
    capped = define_workflow("rc-capped", handler=noop, registry=registry, max_concurrency=2)
    await client.sync_registry()
    store = await _store(client)
    runs = []
    for i in range(4):
        runs.append(await client.enqueue_definition(plain, {"p": i}))
        runs.append(await client.enqueue_definition(capped, {"c": i}))
    bad = [runs[1].id, runs[4].id]  # one capped, one plain
    for rid in bad:
        await store.redis.execute("HSET", store.keys.runs, rid, DAMAGED)
    claimed = await claim_batch(store, "default", 10)
    ids = {r.id for r in claimed}
    assert not ids & set(bad)
    for r in claimed:  # each claimed run carries its own input
        header = (await _headers(store))[r.id]
        expected = await store.redis.execute("HGET", store.keys.inputs, r.id)
        assert r.input == expected, (r.id, r.input, expected, header)
    assert len([r for r in claimed if r.header.workflow == capped.name]) == 2
    await consistent(store)
    ready = await store.redis.execute("LRANGE", store.keys.ready("default"), 0, -1)
    assert sorted(x.decode() for x in ready) == sorted(bad)


@pytest.mark.parametrize("key", ["inputs", "running", "index", "leases", "owned", "bell"])
async def test_a_clobbered_key_of_the_batched_writes_pops_nothing(
    client: RedflowClient, registry: WorkflowRegistry, key: str
) -> None:
    """Redis keeps a script's writes made before it raised: a WRONGTYPE after the RPOP lost the batch
    (still `queued`, or `running` and owned by a worker that never got the reply)."""
    plain = define_workflow("rc-plain2", handler=noop, registry=registry)
    await client.sync_registry()
    store = await _store(client)
    runs = [await client.enqueue_definition(plain, i) for i in range(3)]
    k = store.keys
    name = {"owned": k.owned("w"), "bell": k.bell("default")}.get(key) or getattr(k, key)
    await store.redis.execute("DEL", name)
    await store.redis.execute("SET", name, "clobbered")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await store.claim("w", ["default"], 10, 10)
    ready = await store.redis.execute("LRANGE", k.ready("default"), 0, -1)
    assert sorted(x.decode() for x in ready) == sorted(r.id for r in runs)  # nothing popped
    headers = await _headers(store)
    assert all(headers[r.id]["s"] == "queued" and "o" not in headers[r.id] for r in runs), headers


async def test_a_due_run_of_a_clobbered_ready_list_stays_scheduled(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    """promote_due's RPUSH to a ready list of the wrong type raised after the run was saved `queued`:
    re-scheduled a minute later, the next promotion found it queued and dropped it from the zset."""
    plain = define_workflow("rc-plain3", handler=noop, registry=registry)
    await client.sync_registry()
    store = await _store(client)
    k = store.keys
    run = await client.enqueue_definition(plain, 1, run_at=datetime.now(UTC) + timedelta(milliseconds=50))
    await asyncio.sleep(0.2)
    await store.redis.execute("SET", k.ready("default"), "clobbered")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await store.claim("w", ["default"], 10, 10)
    assert (await _headers(store))[run.id]["s"] == "scheduled"
    assert await store.redis.execute("ZSCORE", k.scheduled("default"), run.id) is not None
