"""Running runs have no index members: each workflow's running runs are counted in the ``running``
hash and listed from the lease holders. Listing, paging, counting, limits and the hooks' and
admission claims' leases must still give the answers the index gave."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from redflow import (
    ListRunsParams,
    RedflowClient,
    SearchRunsParams,
    WorkflowHandlerContext,
    WorkflowRegistry,
    define_workflow,
)
from redflow.storage.index import running_filter

from ..conftest import wait_until
from ..partitioned import every, keys_of

pytestmark = pytest.mark.timeout(60)


async def _running_counts(client: RedflowClient) -> dict[str, int]:
    """Each workflow's running count, summed over the partitions (each counts its own runs)."""
    counts: Counter[str] = Counter()
    for flat in await every(client, lambda k: ("HGETALL", k.running)):
        for i in range(0, len(flat), 2):
            counts[flat[i].decode()] += int(flat[i + 1])
    return dict(counts)


async def _running_members(client: RedflowClient) -> int:
    members = [m for ms in await every(client, lambda k: ("ZRANGEBYLEX", k.index, "-", "+")) for m in ms]
    return sum(1 for m in members if m.startswith(b"s:running:") or b":running:" in m)


async def test_running_runs_are_counted_and_listed_without_index_members(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    gate = asyncio.Event()

    async def blocked(ctx: WorkflowHandlerContext) -> Any:
        await gate.wait()
        return ctx.input

    alpha = define_workflow("count-alpha", handler=blocked, registry=registry)
    beta = define_workflow("count-beta", handler=blocked, registry=registry)
    await make_worker(concurrency=10)
    a_ids = [(await client.enqueue_definition(alpha, i)).id for i in range(3)]
    b_ids = [(await client.enqueue_definition(beta, i)).id for i in range(2)]

    async def all_running() -> bool:
        return (await client.get_stats())["by_status"]["running"] == 5

    await wait_until(all_running, what="5 runs running")
    assert await _running_counts(client) == {"count-alpha": 3, "count-beta": 2}
    assert await _running_members(client) == 0

    newest_first = [r["id"] for r in await client.list_runs(ListRunsParams(status="running"))]
    assert newest_first == sorted(a_ids + b_ids, reverse=True)
    oldest_first = [r["id"] for r in await client.list_runs(ListRunsParams(status="running", sort="asc"))]
    assert oldest_first == sorted(a_ids + b_ids)
    only_alpha = await client.list_runs(ListRunsParams(status="running", workflow="count-alpha"))
    assert [r["id"] for r in only_alpha] == sorted(a_ids, reverse=True)
    assert {r["status"] for r in only_alpha} == {"running"}

    # Pages of two, by cursor, newest first: every run once, in order.
    paged: list[str] = []
    cursor = None
    while True:
        page = await client.list_runs(ListRunsParams(status="running", limit=2, cursor=cursor))
        if not page:
            break
        paged += [r["id"] for r in page]
        cursor = page[-1]["cursor"]
    assert paged == newest_first

    found = await client.search_runs(SearchRunsParams(status="running", workflow="count-beta"))
    assert sorted(r["id"] for r in found["runs"]) == sorted(b_ids)
    # Without a status filter, running runs are merged with the others in id order.
    every = [r["id"] for r in await client.list_runs(ListRunsParams(workflow="count-beta"))]
    assert every == sorted(b_ids, reverse=True)

    gate.set()
    for run_id in a_ids + b_ids:
        await client.make_run_handle(run_id).result(timeout_ms=10_000)
    assert await _running_counts(client) == {}  # a workflow's field goes when its count reaches zero
    stats = await client.get_stats()
    assert stats["by_status"]["running"] == 0 and stats["by_status"]["succeeded"] == 5
    assert await client.list_runs(ListRunsParams(status="running")) == []


async def test_leases_that_are_not_running_runs_are_not_listed_as_running(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    """A failed run whose on_failure hook is running holds a lease; so does a queued run claimed for
    admission. Neither is running, and neither is counted or listed as running."""
    hook_gate, hook_started = asyncio.Event(), asyncio.Event()

    async def fails(ctx: WorkflowHandlerContext) -> Any:
        raise ValueError("no")

    async def on_failure(ctx: Any) -> None:
        hook_started.set()
        await hook_gate.wait()

    failing = define_workflow("count-hooked", handler=fails, on_failure=on_failure, registry=registry)
    await make_worker(concurrency=4)
    handle = await client.enqueue_definition(failing, 1)
    await asyncio.wait_for(hook_started.wait(), 10)
    assert await client.redis.execute("HEXISTS", keys_of(client, handle.id).leases, handle.id) == 1
    assert (await client.get_run(handle.id) or {}).get("status") == "failed"
    assert await client.list_runs(ListRunsParams(status="running")) == []
    assert await _running_counts(client) == {}
    hook_gate.set()


async def test_max_concurrency_and_a_mutex_see_the_counts(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    gate = asyncio.Event()
    peak = 0
    now = 0

    async def tracked(ctx: WorkflowHandlerContext) -> Any:
        nonlocal peak, now
        now += 1
        peak = max(peak, now)
        try:
            await gate.wait()
        finally:
            now -= 1

    limited = define_workflow("count-limited", handler=tracked, max_concurrency=2, registry=registry)
    locked = define_workflow("count-locked", handler=tracked, mutex=lambda i: "one",
                             registry=registry)
    await make_worker(concurrency=10)
    handles = [await client.enqueue_definition(limited, i) for i in range(5)]
    handles += [await client.enqueue_definition(locked, i) for i in range(3)]

    async def settled() -> bool:
        return await _running_counts(client) == {"count-limited": 2, "count-locked": 1}

    await wait_until(settled, what="2 limited runs and 1 locked run running")
    explained = await client.explain_run(handles[4].id)
    assert explained["reason"] == "held_capacity"
    assert explained["details"]["running"] == 2
    gate.set()
    for h in handles:
        await h.result(timeout_ms=15_000)
    assert peak <= 3  # never more than 2 limited runs and 1 locked run at once
    assert await _running_counts(client) == {}


@pytest.mark.parametrize(("prefix", "expected"), [
    (b"s:running:", ""),
    (b"ws:5:alpha:running:", "alpha"),
    (b"ws:13:alpha:running:running:", "alpha:running"),  # a name that ends like the status
    (b"ws:9:x:running:succeeded:", None),  # workflow 'x:running', status succeeded
    (b"s:queued:", None),
    (b"ws:5:alpha:queued:", None),
])
def test_running_prefixes_are_recognised_exactly(prefix: bytes, expected: str | None) -> None:
    assert running_filter(prefix) == expected
