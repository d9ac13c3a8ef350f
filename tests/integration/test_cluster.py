"""On a Redis Cluster: the client finds every master from one node's URL, prefixes land on different
masters, and a prefix's slot resharded to another master mid-traffic (ASK while half moved, MOVED
after) loses no run and runs no recorded step twice.

These tests need the cluster the session starts with REDFLOW_TEST_CLUSTER=3 (a stage of .ci/run);
on a single server they are skipped, and the rest of the suite covers the same code.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from typing import Any

import pytest
import redis

from redflow import RedflowClient, WorkflowHandlerContext, WorkflowRegistry, create_client, define_workflow
from redflow.storage.keys import PartitionKeys, partition_of

from ..cluster_harness import LocalCluster, key_slot, prefix_slot
from ..conftest import WorkerFactory, wait_until


@pytest.mark.usefixtures("one_partition")  # one prefix, one slot
async def test_one_node_url_reaches_every_master_and_prefixes_spread(
    cluster: LocalCluster, redis_url: str, registry: WorkflowRegistry, make_worker: WorkerFactory,
) -> None:
    async def echo(ctx: WorkflowHandlerContext) -> Any:
        return await ctx.step.run("echo", lambda: ctx.input)

    define_workflow("cluster-echo", handler=echo, registry=registry)
    masters = {m.port for m in cluster.masters()}
    base = f"rft:{uuid.uuid4().hex[:8]}"
    prefixes: dict[int, str] = {}  # one prefix on each master
    for i in range(500):
        prefixes.setdefault(cluster.slot_owner(prefix_slot(f"{base}:{i}")).port, f"{base}:{i}")
        if len(prefixes) == len(masters):
            break
    assert set(prefixes) == masters
    clients: list[RedflowClient] = []
    try:
        for port, prefix in prefixes.items():
            c = create_client(url=redis_url, prefix=prefix)
            c.registry = registry
            clients.append(c)
            await make_worker(prefix=prefix)
            handles = [await c.run_by_name("cluster-echo", {"n": n}) for n in range(40)]
            assert [await h.result(timeout_ms=15_000) for h in handles] == [{"n": n} for n in range(40)]
            assert c.redis.is_cluster
            assert {n.address.port for n in await c.redis.masters()} == masters
            assert (await c.redis.node_for(c.keys.runs)).address.port == port
            owner = next(m for m in cluster.masters() if m.port == port)
            assert owner.execute("HLEN", c.keys.runs) == 40  # the data lives on that master only
            for other in cluster.masters():
                if other is not owner:
                    with pytest.raises(redis.exceptions.MovedError):
                        other.execute("EXISTS", c.keys.runs)
    finally:
        for c in clients:
            await c.close()


@pytest.mark.usefixtures("one_partition")  # one prefix, one slot
async def test_slot_resharded_mid_traffic_loses_and_repeats_nothing(
    cluster: LocalCluster, client: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory,
) -> None:
    executed: collections.Counter[tuple[str, str]] = collections.Counter()

    async def two_steps(ctx: WorkflowHandlerContext) -> Any:
        a = await ctx.step.run("a", lambda: executed.update([(ctx.run.id, "a")]) or ctx.input)
        await asyncio.sleep(0.002)
        return await ctx.step.run("b", lambda: executed.update([(ctx.run.id, "b")]) or a)

    define_workflow("cluster-move", handler=two_steps, registry=registry)
    await client.store.ensure_ready()
    slot = prefix_slot(client.keys.prefix)
    source = cluster.slot_owner(slot)
    target = next(m for m in cluster.masters() if m is not source)
    await make_worker(concurrency=20)
    await make_worker(concurrency=20)
    handles = [await client.run_by_name("cluster-move", n) for n in range(100)]

    stop = asyncio.Event()

    async def keep_enqueuing() -> None:
        n = 100
        while not stop.is_set():
            handles.append(await client.run_by_name("cluster-move", n))
            n += 1
            await asyncio.sleep(0.005)

    feeder = asyncio.ensure_future(keep_enqueuing())
    # Pauses between batches let traffic meet the half-moved slot (ASK, TRYAGAIN).
    moved = await asyncio.to_thread(cluster.move_slot, slot, target, 3, lambda: time.sleep(0.05))
    await asyncio.sleep(0.3)  # traffic after the move meets MOVED
    stop.set()
    await feeder
    assert moved > 5
    results = await asyncio.gather(*(h.result(timeout_ms=30_000) for h in handles))
    assert results == list(range(len(handles)))
    assert all(executed[(h.id, s)] == 1 for h in handles for s in "ab"), "a recorded step ran twice"
    assert cluster.slot_owner(slot) is target
    assert target.execute("HLEN", client.keys.runs) == len(handles)
    assert source.execute("CLUSTER", "COUNTKEYSINSLOT", slot) == 0


async def test_ask_during_a_move_and_moved_after_are_followed(cluster: LocalCluster, redis_url: str) -> None:
    while True:  # a slot no earlier test left keys in: SETSLOT NODE refuses a slot whose owner holds keys
        tag = f"rft:{uuid.uuid4().hex[:8]}"
        slot = key_slot(f"{{{tag}}}")
        source = cluster.slot_owner(slot)
        if source.execute("CLUSTER", "COUNTKEYSINSLOT", slot) == 0:
            break
    target = next(m for m in cluster.masters() if m is not source)
    c = create_client(url=redis_url, prefix=tag)
    try:
        await c.redis.execute("SET", f"{{{tag}}}:moved", "m")
        await c.redis.execute("SET", f"{{{tag}}}:stays", "s")
        target.execute("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        source.execute("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
        source.execute("MIGRATE", target.host, target.port, f"{{{tag}}}:moved", 0, 5000)
        asked = c.redis.counters.by_name["ASKING"]
        assert await c.redis.execute("GET", f"{{{tag}}}:moved") == b"m"  # source answers ASK
        assert c.redis.counters.by_name["ASKING"] == asked + 1
        assert await c.redis.execute("GET", f"{{{tag}}}:stays") == b"s"  # still on the source
        source.execute("MIGRATE", target.host, target.port, f"{{{tag}}}:stays", 0, 5000)
        for node in [target, source, *(m for m in cluster.masters() if m not in (source, target))]:
            node.execute("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
        assert await c.redis.execute("GET", f"{{{tag}}}:stays") == b"s"  # MOVED, then the target
        assert (await c.redis.node_for(f"{{{tag}}}")).address.port == target.port
    finally:
        await c.redis.execute("DEL", f"{{{tag}}}:moved")
        await c.redis.execute("DEL", f"{{{tag}}}:stays")
        await c.close()


async def test_one_queue_of_a_partitioned_prefix_spreads_over_every_master(
    cluster: LocalCluster, redis_url: str, registry: WorkflowRegistry, make_worker: WorkerFactory,
) -> None:
    """Eight partitions: their slots land on all three masters (the test picks such a prefix), the
    runs of one queue spread over them, and one worker drains them all."""
    partitions = 8
    masters = {m.port for m in cluster.masters()}
    base = f"rft:{uuid.uuid4().hex[:8]}"
    prefix = next(
        f"{base}:{i}" for i in range(200)
        if {cluster.slot_owner(key_slot(PartitionKeys(f"{base}:{i}", f"p{n}").runs)).port
            for n in range(partitions)} == masters
    )

    async def echo(ctx: WorkflowHandlerContext) -> Any:
        return await ctx.step.run("echo", lambda: ctx.input)

    define_workflow("cluster-spread", handler=echo, registry=registry)
    c = create_client(url=redis_url, prefix=prefix, partitions=partitions)
    c.registry = registry
    try:
        await c.store.ensure_ready()
        await make_worker(prefix=prefix, concurrency=8)
        handles = [await c.run_by_name("cluster-spread", n) for n in range(96)]
        assert {partition_of(h.id) for h in handles} == {f"p{n}" for n in range(partitions)}
        assert await asyncio.gather(*(h.result(timeout_ms=20_000) for h in handles)) == list(range(96))
        per_master: collections.Counter[int] = collections.Counter()
        for s in c.store.partitions:
            owner = cluster.slot_owner(key_slot(s.keys.runs))
            per_master[owner.port] += owner.execute("HLEN", s.keys.runs)
        assert set(per_master) == masters and sum(per_master.values()) == 96
        assert all(n >= 12 for n in per_master.values()), per_master  # at least one partition (12 runs) each
        assert (await c.get_stats())["by_status"]["succeeded"] == 96
    finally:
        await c.close()


async def test_a_late_relayed_end_message_does_not_answer_a_retried_run(
    cluster: LocalCluster, client: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory,
) -> None:
    """A cluster relays PUBLISH between nodes late, so result() can hear the end of an attempt an
    operator has since retried. The message here is the one the cancel published, sent again from
    the run's node after result() subscribed; a probe sent after it on the same node proves it was
    delivered before the worker starts."""
    async def echo(ctx: WorkflowHandlerContext) -> Any:
        return ctx.input

    define_workflow("cluster-late-end", handler=echo, registry=registry)
    handle = await client.run_by_name("cluster-late-end", 7)
    assert await client.cancel_run(handle.id)
    await client.retry_run(handle.id)
    assert (await handle.get_state() or {}).get("status") == "queued"

    keys = client.store.of(handle.id).keys
    channel = keys.done_channel(handle.id)
    run_node = cluster.node_for_key(keys.runs)
    waiting = asyncio.ensure_future(handle.result(timeout_ms=20_000))

    def subscribed() -> str | None:
        n = sum(m.execute("PUBSUB", "NUMSUB", channel)[1] for m in cluster.masters())
        return None if n else "result() has not subscribed yet"

    await wait_until(lambda: subscribed() is None, what="result() subscribes")
    probe_heard = asyncio.Event()
    probe = f"{keys.base}:probe".encode()
    subscriber = client._subscriber
    assert subscriber is not None
    def on_probe(_payload: bytes | None) -> None:
        probe_heard.set()

    await subscriber.subscribe(probe, on_probe)
    try:
        run_node.execute("PUBLISH", channel, b'canceled\n{"name":"CanceledError","message":"stale"}')
        run_node.execute("PUBLISH", probe, b"after")
        await asyncio.wait_for(probe_heard.wait(), 10)
        done, _ = await asyncio.wait({waiting}, timeout=0.5)  # the stale message, if trusted, ends it
        assert not done, f"result() answered from a stale message: {waiting.exception()!r}"
        await make_worker()
        assert await waiting == 7
    finally:
        subscriber.unsubscribe(probe, on_probe)
        waiting.cancel()
