"""Child workflows: run_workflow (durable wait), emit_workflow, failures, cancels, timeouts."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from redflow import (
    CanceledError,
    RedflowClient,
    RedflowError,
    RunFailedError,
    WorkflowHandlerContext,
    WorkflowRegistry,
    WorkflowRetryPolicy,
    define_workflow,
)

from ..conftest import wait_until


async def test_run_workflow_returns_child_output_and_frees_the_parent_slot(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    parent_runs: list[int] = []

    async def child(ctx: WorkflowHandlerContext) -> dict:
        await ctx.step.wait_for("think", "200ms")
        return {"doubled": ctx.input * 2, "parent": ctx.run.id}

    async def parent(ctx: WorkflowHandlerContext) -> Any:
        parent_runs.append(ctx.run.attempt)
        child_def = registry.get("doubler")
        out = await ctx.step.run_workflow("double", child_def, 21)
        fire = await ctx.step.emit_workflow("fire", "doubler", 1, queue_override="other")
        return {"out": out["doubled"], "fire": fire}

    define_workflow("doubler", handler=child, registry=registry)
    wf = define_workflow("parent-wf", handler=parent, registry=registry)
    worker = await make_worker(concurrency=1, queues=["default", "other"])
    handle = await client.enqueue_definition(wf, None)
    result = await handle.result(timeout_ms=10_000)
    assert result["out"] == 42
    fired = await client.get_run(result["fire"])
    assert fired is not None and fired["queue"] == "other" and fired["parent_run_id"] == handle.id
    assert parent_runs == [1, 1]  # one attempt: the first run, and the replay once the child ended
    kids = await client.store.children_of(handle.id)
    assert len(kids) == 2 and result["fire"] in kids
    assert (await client.make_run_handle(result["fire"]).result(timeout_ms=10_000))["doubled"] == 2
    await wait_until(lambda: not worker.active, what="worker idle")


async def test_failed_child_raises_in_parent_and_is_not_cached(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    child_ids: list[str] = []

    async def flaky_child(ctx: WorkflowHandlerContext) -> str:
        child_ids.append(ctx.run.id)
        if len(child_ids) == 1:
            raise ValueError("child broke")
        return "fixed"

    async def parent(ctx: WorkflowHandlerContext) -> str:
        try:
            return await ctx.step.run_workflow("kid", "flaky-child", None)
        except RedflowError as exc:
            assert "child run" in str(exc) and "child broke" in str(exc)
            raise

    define_workflow("flaky-child", handler=flaky_child, max_attempts=1, registry=registry)
    wf = define_workflow("retrying-parent", handler=parent, retries=WorkflowRetryPolicy(delay=10), registry=registry)
    await make_worker(concurrency=4)
    handle = await client.enqueue_definition(wf, None)
    assert await handle.result(timeout_ms=10_000) == "fixed"
    assert len(set(child_ids)) == 2  # the parent's second attempt started a new child
    state = await client.get_run(handle.id)
    assert state is not None and state["attempt"] == 2


async def test_canceled_child_raises_canceled_error_in_parent(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def sleepy(ctx: WorkflowHandlerContext) -> None:
        await ctx.step.wait_for("zz", "1h")

    async def parent(ctx: WorkflowHandlerContext) -> str:
        try:
            await ctx.step.run_workflow("kid", "sleepy-child", None)
        except CanceledError:
            return "child canceled"
        return "unexpected"

    define_workflow("sleepy-child", handler=sleepy, registry=registry)
    wf = define_workflow("cancel-aware-parent", handler=parent, registry=registry)
    await make_worker(concurrency=4)
    handle = await client.enqueue_definition(wf, None)
    kids = await wait_until(lambda: client.store.children_of(handle.id), what="child started")
    await wait_until(lambda: _is(client, kids[0], "scheduled"), what="child sleeping")
    assert await client.cancel_run(kids[0]) is True
    assert await handle.result(timeout_ms=10_000) == "child canceled"


async def test_run_workflow_timeout_cancels_the_child(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def slow(ctx: WorkflowHandlerContext) -> None:
        await ctx.step.wait_for("zz", "1h")

    async def parent(ctx: WorkflowHandlerContext) -> None:
        await ctx.step.run_workflow("kid", "slow-child", None, timeout_ms=300)

    define_workflow("slow-child", handler=slow, registry=registry)
    wf = define_workflow("impatient", handler=parent, max_attempts=1, registry=registry)
    await make_worker(concurrency=4)
    handle = await client.enqueue_definition(wf, None)
    with pytest.raises(RunFailedError) as info:
        await handle.result(timeout_ms=10_000)
    assert info.value.error["kind"] == "timeout"
    kids = await client.store.children_of(handle.id)
    await wait_until(lambda: _is(client, kids[0], "canceled"), what="child canceled")


async def test_child_that_finishes_before_parent_suspends_is_not_missed(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def instant(ctx: WorkflowHandlerContext) -> str:
        return "instant"

    async def parent(ctx: WorkflowHandlerContext) -> list[str]:
        return [await ctx.step.run_workflow(f"kid-{i}", "instant-child", i) for i in range(5)]

    define_workflow("instant-child", handler=instant, registry=registry)
    wf = define_workflow("many-kids", handler=parent, registry=registry)
    await make_worker(concurrency=8)
    await make_worker(concurrency=8)
    handles = [await client.enqueue_definition(wf, None) for _ in range(10)]
    results = await asyncio.gather(*(h.result(timeout_ms=20_000) for h in handles))
    assert results == [["instant"] * 5] * 10


async def _is(client: RedflowClient, run_id: str, status: str) -> bool:
    state = await client.get_run(run_id)
    return bool(state and state["status"] == status)
