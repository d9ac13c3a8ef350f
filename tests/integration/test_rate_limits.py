"""Throttle and rate limit: budgets charged at first start only, windows that open without polling."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from redflow import (
    RedflowClient,
    RunFailedError,
    WorkflowHandlerContext,
    WorkflowRateLimitOptions,
    WorkflowRegistry,
    define_workflow,
)

from ..conftest import wait_until


async def test_throttle_delays_runs_over_budget_until_the_window_opens(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    started: list[float] = []

    async def handler(ctx: WorkflowHandlerContext) -> int:
        started.append(asyncio.get_running_loop().time())
        return ctx.input["n"]

    wf = define_workflow(
        "throttled", handler=handler,
        throttle=WorkflowRateLimitOptions(key=lambda i: f"t:{i['tenant']}", limit=2, period="600ms"),
        registry=registry,
    )
    worker = await make_worker(concurrency=10)
    handles = [await client.enqueue_definition(wf, {"tenant": "a", "n": n}) for n in range(4)]
    other = await client.enqueue_definition(wf, {"tenant": "b", "n": 99})  # another key: its own budget
    assert await other.result(timeout_ms=5000) == 99
    await wait_until(lambda: len(started) >= 3, timeout_s=5, what="first window")
    states = [await client.get_run(h.id) for h in handles]
    assert sorted(s["status"] for s in states if s) == ["scheduled", "scheduled", "succeeded", "succeeded"]
    # While throttled runs wait for their window, the worker sends nothing but its heartbeat.
    counters = worker.store.redis.counters
    before = counters.commands
    await asyncio.sleep(0.2)
    assert counters.commands - before <= 2
    assert sorted(await asyncio.gather(*(h.result(timeout_ms=10_000) for h in handles))) == [0, 1, 2, 3]
    key_ttl = await client.redis.execute("PTTL", client.keys.throttle("throttled", "t:a"))
    assert key_ttl == -2 or 0 < key_ttl <= 600  # every admission key expires


async def test_rate_limit_fails_over_budget_runs_and_is_not_charged_on_resume(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    handled: list[int] = []
    hooks: list[tuple[str, Any]] = []

    async def handler(ctx: WorkflowHandlerContext) -> int:
        handled.append(ctx.input["n"])
        await ctx.step.wait_for("nap", "100ms")  # the resume must not be charged again
        return ctx.input["n"]

    async def on_failure(ctx: Any) -> None:
        hooks.append((ctx.error.kind, ctx.run.id))

    wf = define_workflow(
        "rate-limited", handler=handler, on_failure=on_failure,
        rate_limit=WorkflowRateLimitOptions(key=lambda i: "tenant", limit=2, period="1m"), registry=registry,
    )
    await make_worker(concurrency=10)
    first = [await client.enqueue_definition(wf, {"n": n}) for n in range(2)]
    assert sorted(await asyncio.gather(*(h.result(timeout_ms=10_000) for h in first))) == [0, 1]
    third = await client.enqueue_definition(wf, {"n": 2})
    with pytest.raises(RunFailedError) as info:
        await third.result(timeout_ms=10_000)
    assert info.value.error["kind"] == "rate_limited" and info.value.error["retryAfterMs"] > 0
    await wait_until(lambda: hooks, what="on_failure")
    assert hooks == [("rate_limited", third.id)]
    assert 2 not in handled  # its handler never ran


async def test_debounce_latest_input_wins_and_timeout_caps_the_delay(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    from redflow import WorkflowDebounceOptions

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        return ctx.input

    wf = define_workflow(
        "debounced", handler=handler,
        debounce=WorkflowDebounceOptions(key=lambda i: f"doc:{i['doc']}", period="400ms", timeout="1s"),
        registry=registry,
    )
    await make_worker()
    first = await client.enqueue_definition(wf, {"doc": 1, "rev": 0})
    created = (await client.get_run(first.id))["created_at"]
    # Keep calling more often than the period: only the timeout cap lets the run start.
    rev = 0
    while True:
        rev += 1
        again = await client.enqueue_definition(wf, {"doc": 1, "rev": rev})
        state = await client.get_run(first.id)
        if again.id != first.id or state["status"] != "scheduled":
            break
        assert state["available_at"] <= created + 1000  # never past the timeout
        await asyncio.sleep(0.1)
    result = await first.result(timeout_ms=10_000)
    assert result["doc"] == 1 and result["rev"] >= 5  # a later input replaced the first one
    state = await client.get_run(first.id)
    assert state["started_at"] >= created + 1000 - 5  # held back until the timeout cap, then started
    other = await client.enqueue_definition(wf, {"doc": 2, "rev": 0})
    assert other.id != first.id
