"""Scale checks: index-served queries stay flat as history grows; retention returns memory."""

from __future__ import annotations

import asyncio

import pytest

from redflow import (
    ListRunsParams,
    RedflowClient,
    SearchRunsParams,
    WorkflowHandlerContext,
    WorkflowRegistry,
    create_client,
    define_workflow,
)

from ..conftest import wait_until


async def _noop(ctx: WorkflowHandlerContext) -> object:
    return ctx.input


async def _server_usec(client: RedflowClient) -> int:
    info = (await client.redis.execute_at(client.keys.base, "INFO", "commandstats")).decode()
    total = 0
    for line in info.splitlines():
        if line.startswith("cmdstat_") and "usec=" in line:
            total += int(line.split("usec=")[1].split(",")[0])
    return total


async def _fill(client: RedflowClient, wf, n: int) -> None:  # type: ignore[no-untyped-def]
    for start in range(0, n, 5000):
        await asyncio.gather(*(client.enqueue_definition(wf, {"i": i}) for i in range(start, min(n, start + 5000))))


async def _page_cost(client: RedflowClient, rounds: int = 20) -> float:
    """Server time of one filtered page of 50 (list and search), averaged; INFO itself is excluded."""
    before = await _server_usec(client)
    info_cost_before = await _server_usec(client) - before
    before = await _server_usec(client)
    for _ in range(rounds):
        await client.list_runs(ListRunsParams(status="queued", workflow="scale", limit=50))
        await client.search_runs(SearchRunsParams(workflow="scale", status="queued", limit=50))
    return (await _server_usec(client) - before - info_cost_before) / rounds


@pytest.mark.timeout(180)
async def test_filtered_page_cost_does_not_grow_with_history(redis_url: str, prefix: str) -> None:
    reg = WorkflowRegistry()
    wf = define_workflow("scale", handler=_noop, registry=reg)
    small = create_client(url=redis_url, prefix=prefix + ":small")
    big = create_client(url=redis_url, prefix=prefix + ":big")
    small.registry = big.registry = reg
    try:
        await _fill(small, wf, 100)
        await _fill(big, wf, 100_000)
        # Best of several rounds, interleaved: the machine is shared, and only the floor is comparable.
        small_costs, big_costs = [], []
        for _ in range(5):
            small_costs.append(await _page_cost(small))
            big_costs.append(await _page_cost(big))
        small_cost, big_cost = min(small_costs), min(big_costs)
        print(f"page of 50: {big_cost:.0f} us at 100k runs, {small_cost:.0f} us at 100")
        assert big_cost <= 3 * small_cost, f"page of 50: {big_cost:.0f} us at 100k runs, {small_cost:.0f} us at 100"
    finally:
        for c in (small, big):
            await c.reset_state()
            await c.close()


ALLOWED_AFTER_CLEANUP = {"version", "partitions", "workflows", "seq", "epoch", "cron_version", "limits", "admission",
                         "registrations"}


@pytest.mark.timeout(180)
async def test_finished_expired_and_cleaned_runs_leave_nothing_behind(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    wf = define_workflow("mem", handler=_noop, registry=registry)

    async def cycle(n: int) -> None:
        handles = []
        for start in range(0, n, 2000):
            batch = range(start, start + 2000)
            handles += await asyncio.gather(*(client.enqueue_definition(wf, {"i": i}) for i in batch))
        await wait_until(lambda: _all_succeeded(client, handles[-1].id), timeout_s=120, what="drain")
        await asyncio.gather(*(h.result(timeout_ms=60_000) for h in handles[-50:]))
        while await client.cleanup_expired_runs_now(reference_time_ms=2**45) > 0:
            pass

    async def used_memory() -> int:
        await client.redis.execute_at(client.keys.base, "MEMORY", "PURGE")
        info = (await client.redis.execute_at(client.keys.base, "INFO", "memory")).decode()
        return int(next(line for line in info.splitlines() if line.startswith("used_memory:")).split(":")[1])

    worker = await make_worker(concurrency=200)
    await cycle(2000)  # warm-up: allocator pools and encodings settle
    baseline = await used_memory()
    await cycle(10_000)
    after = await used_memory()
    assert after - baseline <= 16 * 10_000, f"{after - baseline} bytes left after 10,000 runs"
    await worker.stop()
    keys = [k.decode().rsplit(":", 1)[-1] for k in await client.redis.execute("KEYS", f"{client.prefix}:*")]
    assert set(keys) <= ALLOWED_AFTER_CLEANUP, sorted(set(keys) - ALLOWED_AFTER_CLEANUP)


async def _all_succeeded(client: RedflowClient, last_id: str) -> bool:
    stats = await client.get_stats()
    return stats["by_status"]["queued"] == 0 and stats["by_status"]["running"] == 0 and stats["by_status"][
        "scheduled"] == 0
