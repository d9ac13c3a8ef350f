"""Cancellation: queued, scheduled, running, and the cascade to descendants."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from redflow import CanceledError, RedflowClient, WorkflowHandlerContext, WorkflowRegistry, define_workflow

from ..conftest import wait_until


async def _status(client: RedflowClient, run_id: str) -> str | None:
    state = await client.get_run(run_id)
    return state["status"] if state else None


async def test_cancel_queued_and_scheduled_runs(client: RedflowClient, registry: WorkflowRegistry, make_worker) -> None:
    ran: list[str] = []

    async def handler(ctx: WorkflowHandlerContext) -> None:
        ran.append(ctx.run.id)
        await ctx.step.wait_for("nap", "30s")

    wf = define_workflow("cancel-early", handler=handler, registry=registry)
    queued = await client.enqueue_definition(wf, None)
    assert await client.cancel_run(queued.id, reason="not needed") is True
    assert await _status(client, queued.id) == "canceled"
    with pytest.raises(CanceledError, match="not needed"):
        await queued.result(timeout_ms=1000)
    assert await client.cancel_run(queued.id) is False  # already canceled

    await make_worker()
    sleeping = await client.enqueue_definition(wf, None)
    await wait_until(lambda: _is(client, sleeping.id, "scheduled"), what="sleeping")
    assert await client.cancel_run(sleeping.id) is True
    with pytest.raises(CanceledError):
        await sleeping.result(timeout_ms=1000)
    assert ran == [sleeping.id]
    assert await client.cancel_run("01NOPE0000000000000000000-p0") is False


async def test_cancel_running_run_sets_signals_and_skips_on_failure(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    seen: dict[str, Any] = {}
    hooks: list[str] = []

    async def long_step(*, signal: asyncio.Event) -> str:
        seen["step_signal"] = signal
        await asyncio.sleep(30)
        return "never"

    async def handler(ctx: WorkflowHandlerContext) -> str:
        seen["run_signal"] = ctx.signal
        return await ctx.step.run("long", long_step)

    async def on_failure(ctx: Any) -> None:
        hooks.append(ctx.run.id)

    wf = define_workflow("cancel-running", handler=handler, on_failure=on_failure, registry=registry)
    worker = await make_worker()
    handle = await client.enqueue_definition(wf, None)
    await wait_until(lambda: "step_signal" in seen, what="step running")
    counters = worker.store.redis.counters
    before = counters.commands
    await asyncio.sleep(0.3)  # a running run waiting for cancellation costs no commands
    assert counters.commands - before <= 1  # at most a heartbeat
    assert await client.cancel_run(handle.id, reason="user asked") is True
    with pytest.raises(CanceledError, match="user asked"):
        await handle.result(timeout_ms=5000)
    assert seen["run_signal"].is_set() and seen["step_signal"].is_set()
    await asyncio.sleep(0.1)
    assert hooks == []


async def test_cancel_cascades_parent_child_grandchild(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def grandchild(ctx: WorkflowHandlerContext) -> None:
        await ctx.step.wait_for("forever", "1h")

    async def child(ctx: WorkflowHandlerContext) -> None:
        await ctx.step.emit_workflow("spawn", "grandchild", None)
        await ctx.step.run_workflow("wait-gc", "grandchild-2", None)

    async def parent(ctx: WorkflowHandlerContext) -> None:
        await ctx.step.run_workflow("wait-child", "child", None)

    define_workflow("grandchild", handler=grandchild, registry=registry)
    define_workflow("grandchild-2", handler=grandchild, registry=registry)
    define_workflow("child", handler=child, registry=registry)
    wf = define_workflow("parent", handler=parent, registry=registry)
    await make_worker(concurrency=10)
    handle = await client.enqueue_definition(wf, None)

    async def tree() -> list[str] | None:
        kids = await client.store.children_of(handle.id)
        if len(kids) != 1:
            return None
        grandkids = await client.store.children_of(kids[0])
        if len(grandkids) != 2:
            return None
        states = [await _status(client, r) for r in [kids[0], *grandkids]]
        return [kids[0], *grandkids] if all(s == "scheduled" for s in states) else None

    descendants = await wait_until(tree, what="three generations waiting")
    assert await client.cancel_run(handle.id, reason="stop all") is True
    for run_id in [handle.id, *descendants]:
        await wait_until(lambda r=run_id: _is(client, r, "canceled"), what=f"{run_id} canceled")


async def test_lease_loss_alone_cancels_nothing_downstream(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def child(ctx: WorkflowHandlerContext) -> str:
        await ctx.step.wait_for("nap", "300ms")
        return "child-done"

    async def parent(ctx: WorkflowHandlerContext) -> str:
        return await ctx.step.run_workflow("kid", "lease-child", None)

    define_workflow("lease-child", handler=child, registry=registry)
    wf = define_workflow("lease-parent", handler=parent, registry=registry)
    w1 = await make_worker()
    handle = await client.enqueue_definition(wf, None)
    await wait_until(lambda: client.store.children_of(handle.id), what="child started")
    await w1.stop(grace_period_ms=0)
    await make_worker()
    assert await handle.result(timeout_ms=10_000) == "child-done"


async def _is(client: RedflowClient, run_id: str, status: str) -> bool:
    return await _status(client, run_id) == status
