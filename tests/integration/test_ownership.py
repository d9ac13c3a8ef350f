"""Ownership reconciliation (issue 10, item 1): what the server says a worker owns and what it runs agree.

Both tests fail on f04b3d6: a run claimed with a lost reply stayed `running` forever (the heartbeat kept
renewing its worker), and a run whose claim the server forgot kept executing on the old worker.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from redflow import RedflowClient, WorkflowHandlerContext, WorkflowRegistry, define_workflow
from redflow.storage.store import Store

from ..conftest import wait_until
from ..partitioned import keys_of, sibling_of, store_of


async def test_a_claim_whose_reply_was_lost_is_handed_back_and_runs(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def handler(ctx: WorkflowHandlerContext) -> str:
        return "ran"

    wf = define_workflow("lost-reply", handler=handler, registry=registry)
    worker = await make_worker(lease_ms=1500)
    async with contextlib.AsyncExitStack() as locks:
        for w in worker.group:  # the claim loops (one per partition) wait while the "lost" claim happens
            await locks.enter_async_context(w._claim_lock)
        handle = await client.enqueue_definition(wf, None)
        claimer = sibling_of(worker, handle.id)  # the sibling that claims from the run's partition
        _, _, runs = await store_of(client, handle.id).claim(claimer.id, ["default"], 1, 10)  # the reply is lost
        assert [r.id for r in runs] == [handle.id]
    assert await handle.result(timeout_ms=15_000) == "ran"


async def test_a_run_the_server_no_longer_gives_this_worker_stops_here(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    started = asyncio.Event()
    finished: list[str] = []

    async def handler(ctx: WorkflowHandlerContext) -> None:
        started.set()
        await asyncio.sleep(30)
        finished.append(ctx.run.id)

    wf = define_workflow("forgotten-claim", handler=handler, registry=registry)
    worker = await make_worker(lease_ms=1500)
    handle = await client.enqueue_definition(wf, None)
    await asyncio.wait_for(started.wait(), 10)
    # The server restarts without the claim: the lease and the owned entry are gone.
    runner = sibling_of(worker, handle.id)  # the sibling of the run's partition runs it
    assert handle.id in runner.active
    k = keys_of(client, handle.id)
    await client.redis.execute("HDEL", k.leases, handle.id)
    await client.redis.execute("SREM", k.owned(runner.id), handle.id)
    await wait_until(lambda: handle.id not in runner.active, timeout_s=10, what="the local execution stopped")
    assert finished == []


async def test_a_claim_answered_after_renewals_failed_starts_nothing_and_hands_back(
    client: RedflowClient, registry: WorkflowRegistry, make_worker, caplog: pytest.LogCaptureFixture
) -> None:
    # Found by the chaos workload: a claim sent just before the connection froze was answered after
    # the freeze, and the worker started an on_failure hook the lease guard then cut short; the
    # reaper handed it to another worker and it ran twice. A late answer now starts nothing.
    from redflow._redis.errors import ConnectionClosedError

    starts: list[float] = []

    async def handler(ctx: WorkflowHandlerContext) -> str:
        starts.append(asyncio.get_running_loop().time())
        return "ran"

    wf = define_workflow("late-claim", handler=handler, registry=registry)
    worker = await make_worker(lease_ms=1500)
    outage = asyncio.Event()  # one connection freezes for every partition's sibling
    late_claims: list[int] = []

    def patch(store: Store) -> None:
        real_claim, real_heartbeat = store.claim, store.heartbeat

        async def heartbeat(*args: object, **kwargs: object) -> object:
            if outage.is_set():
                raise ConnectionClosedError("frozen (test)")
            return await real_heartbeat(*args, **kwargs)  # type: ignore[arg-type]

        async def claim(*args: object, **kwargs: object) -> object:
            reply = await real_claim(*args, **kwargs)  # type: ignore[arg-type]
            if reply[2] and not late_claims:  # the first claim that takes a run is answered late
                late_claims.append(len(reply[2]))
                outage.set()
                await asyncio.sleep(0.9)  # past half the lease since the last renewal
                outage.clear()
            return reply

        store.heartbeat, store.claim = heartbeat, claim  # type: ignore[method-assign]

    for w in worker.group:
        patch(w.store)
    caplog.set_level("INFO", logger="redflow.worker")
    handle = await client.enqueue_definition(wf, None)
    assert await handle.result(timeout_ms=15_000) == "ran"
    assert late_claims == [1] and len(starts) == 1  # handed back unstarted, then run once
    assert "handing back 1 run(s) unstarted" in caplog.text
    assert f"handed back run {handle.id}" in caplog.text
