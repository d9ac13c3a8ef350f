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


async def _server_usage(client: RedflowClient) -> tuple[int, int]:
    """Command time (us) and commands run by every server holding one of the client's partitions,
    INFO left out."""
    per_server: dict[str, tuple[int, int]] = {}
    for store in client.store.partitions:
        info = (await client.redis.execute_at(store.keys.base, "INFO", "all")).decode()
        lines = [line for line in info.splitlines() if line.startswith("cmdstat_") and "usec=" in line
                 and not line.startswith("cmdstat_info:")]
        server = next(line for line in info.splitlines() if line.startswith("run_id:"))
        per_server[server] = (sum(int(line.split("usec=")[1].split(",")[0]) for line in lines),
                              sum(int(line.split("calls=")[1].split(",")[0]) for line in lines))
    return sum(u for u, _ in per_server.values()), sum(c for _, c in per_server.values())


async def _fill(client: RedflowClient, wf, n: int) -> None:  # type: ignore[no-untyped-def]
    """n queued runs, through the batched enqueue: a page reads index members, which both enqueue
    paths write alike, and one command per chunk fills 100k runs in a fraction of the time."""
    for start in range(0, n, 5000):
        await client.enqueue_many(wf, [{"i": i} for i in range(start, min(n, start + 5000))])


async def _page_cost(client: RedflowClient, rounds: int = 20) -> tuple[float, float]:
    """Server time (us) and server commands of one filtered page of 50 (list and search), averaged."""
    await client.store.ensure_ready()
    usec, calls = await _server_usage(client)
    for _ in range(rounds):
        await client.list_runs(ListRunsParams(status="queued", workflow="scale", limit=50))
        await client.search_runs(SearchRunsParams(workflow="scale", status="queued", limit=50))
    usec_after, calls_after = await _server_usage(client)
    return (usec_after - usec) / rounds, (calls_after - calls) / rounds


@pytest.mark.timeout(180)
async def test_filtered_page_cost_does_not_grow_with_history(redis_url: str, prefix: str) -> None:
    """A page issues as many commands at 100k runs as at 100, over every partition however many,
    and its server time stays within a small factor: index seeks are logarithmic and a big index
    misses the CPU cache (about 2x on a 16-partition cluster), where a cost growing with history
    would be a thousandfold."""
    reg = WorkflowRegistry()
    wf = define_workflow("scale", handler=_noop, registry=reg)
    sizes = (100, 100_000)
    clients = [create_client(url=redis_url, prefix=f"{prefix}:{n}") for n in sizes]
    for c in clients:
        c.registry = reg
    try:
        for c, n in zip(clients, sizes, strict=True):
            await _fill(c, wf, n)
        # Best of several rounds, interleaved: the machine is shared, and only the floor is comparable.
        costs: list[list[tuple[float, float]]] = [[] for _ in sizes]
        for _ in range(5):
            for c, out in zip(clients, costs, strict=True):
                out.append(await _page_cost(c))
        usec = [min(u for u, _ in out) for out in costs]
        calls = [min(n for _, n in out) for out in costs]
        shown = ", ".join(f"{u:.0f} us and {n:.1f} commands at {size} runs"
                          for size, u, n in zip(sizes, usec, calls, strict=True))
        print(f"page of 50: {shown}")
        assert calls[1] <= 1.25 * calls[0], shown
        assert usec[1] <= 4 * usec[0], shown
    finally:
        for c in clients:
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
