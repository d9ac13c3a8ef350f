"""Public API against a real server: definitions, enqueue paths, handles, lifecycle, steps."""

from __future__ import annotations

import asyncio
import math
import re
from collections import Counter
from datetime import datetime, timedelta

import pytest

from redflow import (
    RedflowClient,
    RedflowError,
    RunFailedError,
    StartWorkerOptions,
    TimeoutError,
    UnknownWorkflowError,
    WorkflowHandlerContext,
    WorkflowRegistry,
    create_client,
    define_workflow,
    get_default_client,
    set_default_client,
    start_worker,
    workflow,
)
from redflow.errors import ConfigurationError
from redflow.ids import new_run_id
from redflow.storage.keys import partition_index

from ..partitioned import count, store_of, total


async def test_decorated_workflow_run_through_default_client(redis_url: str, prefix: str, make_worker) -> None:
    @workflow("decorated-default-client", queue="dflt-q")
    async def decorated(ctx: WorkflowHandlerContext) -> dict:
        return {"hello": ctx.input["name"], "queue": ctx.run.queue}

    client = create_client(url=redis_url, prefix=prefix)
    set_default_client(client)
    try:
        assert get_default_client() is client
        worker = await start_worker(StartWorkerOptions(app="t", url=redis_url, prefix=prefix, queues=["dflt-q"]))
        try:
            handle = await decorated.run({"name": "ada"})
            assert await handle.result(timeout_ms=10_000) == {"hello": "ada", "queue": "dflt-q"}
            state = await handle.get_state()
            assert state is not None
            assert state["status"] == "succeeded"
            assert state["workflow"] == "decorated-default-client"
            assert state["created_at"] <= state["started_at"] <= state["finished_at"]
        finally:
            await worker.stop()
    finally:
        set_default_client(None)
        await client.close()


async def test_run_by_name_from_a_client_without_the_definition(
    redis_url: str, prefix: str, registry: WorkflowRegistry, make_worker
) -> None:
    async def handler(ctx: WorkflowHandlerContext) -> int:
        return ctx.input * 3

    define_workflow("remote-def", handler=handler, queue="remote-q", registry=registry)
    await make_worker()
    outsider = create_client(url=redis_url, prefix=prefix)
    outsider.registry = WorkflowRegistry()
    try:
        handle = await outsider.run_by_name("remote-def", 5)
        assert await handle.result(timeout_ms=10_000) == 15
        handle2 = await outsider.emit_workflow("remote-def", 2)
        assert await handle2.result(timeout_ms=10_000) == 6
        with pytest.raises(UnknownWorkflowError, match="no-such-workflow"):
            await outsider.run_by_name("no-such-workflow", {})
    finally:
        await outsider.close()


async def test_lifecycle_scheduled_to_succeeded_with_run_at(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def handler(ctx: WorkflowHandlerContext) -> str:
        return "done"

    wf = define_workflow("delayed", handler=handler, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None, run_at=datetime.now() + timedelta(milliseconds=700))
    state = await client.get_run(handle.id)
    assert state is not None and state["status"] == "scheduled"
    assert await handle.result(timeout_ms=10_000) == "done"
    state = await client.get_run(handle.id)
    assert state is not None and state["started_at"] >= state["available_at"]


async def test_run_ids_are_unique_sortable_and_name_their_partition(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    async def handler(ctx: WorkflowHandlerContext) -> None:
        return None

    wf = define_workflow("ids", handler=handler, registry=registry)
    ids = []
    for _ in range(50):
        ids.append((await client.enqueue_definition(wf, None)).id)
        await asyncio.sleep(0.002)
    assert len(set(ids)) == 50
    assert ids == sorted(ids)
    # Each names its partition, and runs without a key or a limit go round robin over the partitions.
    parts = count(client)
    assert all(re.fullmatch(r".+-p\d+", i) for i in ids)
    first = partition_index(ids[0])
    assert first is not None and 0 <= first < parts
    assert [partition_index(i) for i in ids] == [(first + n) % parts for n in range(50)]


async def test_result_timeout_and_failure(client: RedflowClient, registry: WorkflowRegistry, make_worker) -> None:
    release = asyncio.Event()

    async def slow(ctx: WorkflowHandlerContext) -> None:
        await release.wait()
        raise ValueError("boom")

    wf = define_workflow("slow-fail", handler=slow, max_attempts=1, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    with pytest.raises(TimeoutError):
        await handle.result(timeout_ms=200)
    release.set()
    with pytest.raises(RunFailedError, match="boom") as info:
        await handle.result(timeout_ms=10_000)
    assert info.value.error["name"] == "ValueError"
    assert isinstance(info.value, RedflowError)


async def test_many_waiters_share_one_subscription_connection(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def handler(ctx: WorkflowHandlerContext) -> int:
        return ctx.input

    wf = define_workflow("many-waiters", handler=handler, registry=registry)
    handles = [await client.enqueue_definition(wf, i) for i in range(300)]
    waiters = [asyncio.ensure_future(h.result(timeout_ms=20_000)) for h in handles]
    await asyncio.sleep(0.05)
    info = await client.redis.execute_at(client.keys.base, "CLIENT", "LIST")
    assert info.count(b"sub=") >= 1
    await make_worker(concurrency=50)
    assert await asyncio.gather(*waiters) == list(range(300))


def test_definition_errors_are_clear() -> None:
    async def handler(ctx: WorkflowHandlerContext) -> None:
        return None

    reg = WorkflowRegistry()
    with pytest.raises(ConfigurationError, match="non-empty string"):
        define_workflow("", handler=handler, registry=reg)
    with pytest.raises(ConfigurationError, match="max_attempts"):
        define_workflow("x", handler=handler, max_attempts=0, registry=reg)
    define_workflow("dup", handler=handler, registry=reg)

    async def other(ctx: WorkflowHandlerContext) -> None:
        return None

    with pytest.raises(ConfigurationError, match="already defined"):
        define_workflow("dup", handler=other, registry=reg)


async def test_worker_options_validated_and_no_effect_options_warn(redis_url: str, prefix: str) -> None:
    with pytest.raises(ConfigurationError, match="concurrency"):
        await start_worker(StartWorkerOptions(app="t", url=redis_url, prefix=prefix, concurrency=0))
    with pytest.warns(UserWarning, match="registry_recovery_interval_ms has no effect"):
        worker = await start_worker(
            StartWorkerOptions(
                app="t", url=redis_url, prefix=prefix, registry=WorkflowRegistry(), queues=["q"],
                registry_recovery_interval_ms=5000,
            )
        )
    await worker.stop()


async def test_server_clock_sets_timestamps(client: RedflowClient, registry: WorkflowRegistry) -> None:
    async def handler(ctx: WorkflowHandlerContext) -> None:
        return None

    wf = define_workflow("clock", handler=handler, registry=registry)
    handle = await client.enqueue_definition(wf, None)
    sec, usec = await client.redis.execute_at(client.keys.base, "TIME")
    server_ms = int(sec) * 1000 + int(usec) // 1000
    state = await client.get_run(handle.id)
    assert state is not None and abs(state["created_at"] - server_ms) < 1000


async def test_create_client_accepts_a_redis_py_client(redis_url: str, prefix: str, registry, make_worker) -> None:
    import redis.asyncio as redis_py

    async def handler(ctx: WorkflowHandlerContext) -> str:
        return "via redis-py settings"

    wf = define_workflow("redis-py-client", handler=handler, registry=registry)
    await make_worker()
    rp = redis_py.Redis.from_url(redis_url)
    client = create_client(redis=rp, prefix=prefix)
    client.registry = registry
    try:
        handle = await client.enqueue_definition(wf, None)
        assert await handle.result(timeout_ms=10_000) == "via redis-py settings"
    finally:
        await client.close()
        await rp.aclose()


async def test_enqueue_many_is_one_command_per_chunk_and_safe_to_retry(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    from redflow import PayloadEncodingError

    async def handler(ctx: WorkflowHandlerContext) -> int:
        return ctx.input * 2

    wf = define_workflow("batched", handler=handler, registry=registry)
    await client.store.ensure_ready()
    before = client.redis.counters.commands
    handles = await client.enqueue_many(wf, list(range(2500)), chunk_size=1000)
    # One command per chunk of each partition's share (the inputs are dealt over the partitions).
    shares = Counter(partition_index(h.id) for h in handles)
    assert len(shares) == count(client) and sum(shares.values()) == 2500
    assert client.redis.counters.commands - before == sum(math.ceil(n / 1000) for n in shares.values())
    assert len({h.id for h in handles}) == 2500
    retried = store_of(client, handles[0].id).enqueue_batch([handles[0].id], "batched", "default", [b"7"], 3, 0)
    assert await retried == 0  # a retry in the run's partition creates nothing
    # A retried chunk beyond one read of the existing ids, with one id the first try did not create:
    # that one alone is created, queued once.
    store = store_of(client, handles[0].id)
    same = [h.id for h in handles if store_of(client, h.id) is store]
    fresh = new_run_id(store.keys.partition)
    again = [*same, fresh, *same[:100]]
    assert await store.enqueue_batch(again, "batched", "default", [b"7"] * len(again), 3, 0) == 1
    assert (await client.get_run(fresh))["status"] == "queued"
    assert await client.redis.execute("LPOS", store.keys.ready("default"), fresh, "COUNT", 0) == [0]
    # Fresh ids listed twice in one call: each is created once, queued once, with its first input.
    twice = [new_run_id(store.keys.partition) for _ in range(2)]
    ready_before = await client.redis.execute("LLEN", store.keys.ready("default"))
    assert await store.enqueue_batch([*twice, *twice], "batched", "default", [b"1", b"2", b"3", b"4"], 3, 0) == 2
    assert await client.redis.execute("LLEN", store.keys.ready("default")) == ready_before + 2
    assert [(await client.get_run(i))["input"] for i in twice] == [1, 2]
    keys_before = sorted(await client.redis.execute("KEYS", f"{client.prefix}:*"))
    index_before = await total(client, lambda k: ("ZCARD", k.index))
    with pytest.raises(PayloadEncodingError):
        await client.enqueue_many(wf, [1, 2, object()])
    assert sorted(await client.redis.execute("KEYS", f"{client.prefix}:*")) == keys_before
    assert await total(client, lambda k: ("ZCARD", k.index)) == index_before  # nothing half-written
    later = await client.enqueue_many(wf, [5], run_at=datetime.now() + timedelta(milliseconds=300))
    assert (await client.get_run(later[0].id))["status"] == "scheduled"
    await make_worker(concurrency=100)
    results = await asyncio.gather(*(h.result(timeout_ms=30_000) for h in handles + later))
    assert results == [i * 2 for i in range(2500)] + [10]
