"""Leader duties run beside the heartbeat, bounded and isolated (issue 10, item 4).

Both tests fail on f04b3d6: duties ran inside the heartbeat, so a slow duty stopped the leader's own
renewals and an unexpected error in one duty ended the heartbeat loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from redflow import RedflowClient, WorkflowHandlerContext, WorkflowRegistry, define_workflow

from ..conftest import wait_until


async def _noop(ctx: WorkflowHandlerContext) -> None:
    return None


async def _renewals(client: RedflowClient, worker_id: str, count: int, timeout_s: float) -> None:
    seen: list[float] = []

    async def renewed() -> bool:
        score = await client.redis.execute("ZSCORE", client.keys.workers, worker_id)
        if score is not None and (not seen or float(score) > seen[-1]):
            seen.append(float(score))
        return len(seen) > count

    await wait_until(renewed, timeout_s=timeout_s, what=f"{count} lease renewals")


async def test_a_slow_duty_does_not_stop_the_leaders_renewals(
    client: RedflowClient, registry: WorkflowRegistry, make_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from redflow.leader.duties import LeaderDuties

    reaping = asyncio.Event()

    async def slow_reap(self: LeaderDuties) -> None:
        reaping.set()
        await asyncio.sleep(30)

    monkeypatch.setattr(LeaderDuties, "reap", slow_reap)
    define_workflow("any", handler=_noop, registry=registry)
    worker = await make_worker(lease_ms=1500)
    await wait_until(lambda: worker.is_leader, what="leadership")
    await client.redis.execute("ZADD", client.keys.workers, 0, "dead-worker")  # gives the leader a reap to do
    await asyncio.wait_for(reaping.wait(), 10)
    await _renewals(client, worker.id, 3, timeout_s=10)  # heartbeats go on while the reap is stuck
    assert worker.ready


async def test_an_error_in_one_duty_does_not_stop_the_others(
    client: RedflowClient, registry: WorkflowRegistry, make_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from redflow.leader.cron import CronScheduler

    async def broken(self: CronScheduler, beat: Any) -> None:
        raise RuntimeError("a bug in one duty")

    monkeypatch.setattr(CronScheduler, "on_beat", broken)
    wf = define_workflow("orphan-run", handler=_noop, queue="nobody", registry=registry)
    store = client.store
    handle = await client.enqueue_definition(wf, None)
    await store.heartbeat("dead", 60_000, 60_000, False)
    await store.claim("dead", ["nobody"], 1, 10)
    await client.redis.execute("ZADD", client.keys.workers, 0, "dead")
    worker = await make_worker(lease_ms=1500, queues=["default"])

    async def reaped() -> bool:
        state = await client.get_run(handle.id)
        return state is not None and state["status"] == "queued"

    await wait_until(reaped, timeout_s=15, what="the dead worker's run taken back")
    await _renewals(client, worker.id, 2, timeout_s=10)  # and the heartbeat loop is still alive
