"""Durable sleeps and replay safety."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from redflow import (
    NonDeterminismError,
    RedflowClient,
    RunFailedError,
    WorkflowHandlerContext,
    WorkflowRegistry,
    define_workflow,
)
from redflow.durations import duration_ms

from ..conftest import wait_until


async def test_wait_for_suspends_frees_the_slot_and_resumes(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    body: list[str] = []

    async def before() -> str:
        body.append("before")
        return "b"

    async def sleeper(ctx: WorkflowHandlerContext) -> list[Any]:
        b = await ctx.step.run("before", before)
        await ctx.step.wait_for("nap", ctx.input["nap"])
        return [b, ctx.run.attempt]

    async def quick(ctx: WorkflowHandlerContext) -> str:
        return "quick"

    wf = define_workflow("sleeper", handler=sleeper, registry=registry)
    wf_quick = define_workflow("quick", handler=quick, registry=registry)
    worker = await make_worker(concurrency=1)
    handle = await client.enqueue_definition(wf, {"nap": "600ms"})
    await wait_until(lambda: _status(client, handle.id, "scheduled"), what="sleeping")
    assert not worker.active  # the slot is free while the run sleeps
    assert await (await client.enqueue_definition(wf_quick, None)).result(timeout_ms=5000) == "quick"
    assert await handle.result(timeout_ms=10_000) == ["b", 1]  # same attempt, not a retry
    assert body == ["before"]
    steps = await client.get_run_steps(handle.id)
    assert [s["name"] for s in steps] == ["before", "nap"]


async def test_sleep_accepts_ms_strings_and_datetimes(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def handler(ctx: WorkflowHandlerContext) -> str:
        await ctx.step.wait_for("ms", 50)
        await ctx.step.wait_for("float", 20.5)
        await ctx.step.wait_for("string", "100ms")
        await ctx.step.wait_for("aware", datetime.now(UTC) + timedelta(milliseconds=100))
        await ctx.step.wait_for("naive-local", datetime.now() + timedelta(milliseconds=100))
        await ctx.step.wait_for("past", datetime.now(UTC) - timedelta(days=1))
        return "awake"

    wf = define_workflow("sleep-forms", handler=handler, registry=registry)
    await make_worker()
    assert await (await client.enqueue_definition(wf, None)).result(timeout_ms=10_000) == "awake"
    assert [duration_ms(v, "t") for v in ("500ms", "30s", "5m", "2h", "1d", "1.5s")] == [
        500, 30_000, 300_000, 7_200_000, 86_400_000, 1500
    ]


async def test_sleep_survives_worker_restart(client: RedflowClient, registry: WorkflowRegistry, make_worker) -> None:
    async def handler(ctx: WorkflowHandlerContext) -> str:
        await ctx.step.wait_for("long-nap", "700ms")
        return "rested"

    wf = define_workflow("restart-sleep", handler=handler, registry=registry)
    first = await make_worker()
    handle = await client.enqueue_definition(wf, None)
    await wait_until(lambda: _status(client, handle.id, "scheduled"), what="sleeping")
    await first.stop()
    await make_worker()
    assert await handle.result(timeout_ms=10_000) == "rested"


async def test_changed_handler_code_fails_with_non_determinism_error(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    version = {"v": 1}

    async def step_a() -> str:
        return "a"

    async def handler(ctx: WorkflowHandlerContext) -> str:
        if version["v"] == 1:
            await ctx.step.run("charge-card", step_a)
        else:
            await ctx.step.run("reserve-stock", step_a)  # a different step at position 1
        await ctx.step.wait_for("pause", "300ms")
        return "done"

    wf = define_workflow("replay", handler=handler, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    await wait_until(lambda: _status(client, handle.id, "scheduled"), what="first step recorded")
    version["v"] = 2  # deploy changed code while the run sleeps
    with pytest.raises(RunFailedError) as info:
        await handle.result(timeout_ms=10_000)
    assert info.value.error["kind"] == NonDeterminismError.kind
    assert "'reserve-stock'" in info.value.error["message"] and "'charge-card'" in info.value.error["message"]


async def _status(client: RedflowClient, run_id: str, status: str) -> bool:
    state = await client.get_run(run_id)
    return bool(state and state["status"] == status)


