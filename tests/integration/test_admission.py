"""Admission control: max_concurrency without head-of-line blocking or polling."""

from __future__ import annotations

import asyncio

from redflow import RedflowClient, WorkflowHandlerContext, WorkflowRegistry, define_workflow

from ..conftest import wait_until


async def test_workflow_at_max_concurrency_never_delays_other_workflows(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    gate = asyncio.Event()
    running_a: list[int] = []
    peak = {"a": 0}

    async def slow_a(ctx: WorkflowHandlerContext) -> int:
        running_a.append(1)
        peak["a"] = max(peak["a"], len(running_a))
        await gate.wait()
        running_a.pop()
        return ctx.input

    async def quick_b(ctx: WorkflowHandlerContext) -> str:
        return "b"

    a = define_workflow("adm-a", handler=slow_a, max_concurrency=2, registry=registry)
    b = define_workflow("adm-b", handler=quick_b, registry=registry)
    worker = await make_worker(concurrency=20)
    a_handles = [await client.enqueue_definition(a, i) for i in range(100)]
    await wait_until(lambda: len(running_a) == 2, what="A at its limit")
    b_handles = [await client.enqueue_definition(b, None) for _ in range(10)]
    assert await asyncio.gather(*(h.result(timeout_ms=5000) for h in b_handles)) == ["b"] * 10
    assert len(running_a) == 2
    # Held runs cost nothing while they wait: no claim spin.
    counters = worker.store.redis.counters
    before = counters.commands
    await asyncio.sleep(0.5)
    assert counters.commands - before <= 3
    held = await client.redis.execute("ZCARD", client.keys.held)
    assert held == 98
    gate.set()
    assert await asyncio.gather(*(h.result(timeout_ms=20_000) for h in a_handles)) == list(range(100))
    assert peak["a"] == 2
    assert await client.redis.execute("ZCARD", client.keys.held) == 0


async def test_resumed_runs_count_toward_max_concurrency(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    live: list[str] = []
    peak = {"n": 0}

    async def napper(ctx: WorkflowHandlerContext) -> str:
        live.append(ctx.run.id)
        peak["n"] = max(peak["n"], len(live))
        await asyncio.sleep(0.05)
        live.remove(ctx.run.id)
        await ctx.step.wait_for("nap", "100ms")
        live.append(ctx.run.id)
        peak["n"] = max(peak["n"], len(live))
        await asyncio.sleep(0.05)
        live.remove(ctx.run.id)
        return "ok"

    wf = define_workflow("adm-nap", handler=napper, max_concurrency=1, registry=registry)
    await make_worker(concurrency=10)
    handles = [await client.enqueue_definition(wf, None) for _ in range(5)]
    assert await asyncio.gather(*(h.result(timeout_ms=20_000) for h in handles)) == ["ok"] * 5
    assert peak["n"] == 1


async def test_mutex_one_running_run_per_key_released_on_durable_waits(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    from typing import Any

    events: list[tuple[str, str, str]] = []

    async def handler(ctx: WorkflowHandlerContext) -> str:
        events.append(("start", ctx.input["key"], ctx.input["n"]))
        await asyncio.sleep(0.05)
        events.append(("end", ctx.input["key"], ctx.input["n"]))
        if ctx.input.get("nap"):
            await ctx.step.wait_for("nap", "200ms")  # releases the mutex while sleeping
        return ctx.input["n"]

    wf = define_workflow("mutexed", handler=handler, mutex=lambda i: i["key"], registry=registry)
    await make_worker(concurrency=10)
    handles: list[Any] = [
        await client.enqueue_definition(wf, {"key": "k1", "n": f"a{i}", "nap": i == 0}) for i in range(3)
    ] + [await client.enqueue_definition(wf, {"key": "k2", "n": "b0"})]
    results = await asyncio.gather(*(h.result(timeout_ms=10_000) for h in handles))
    assert sorted(results) == ["a0", "a1", "a2", "b0"]
    running: dict[str, int] = {}
    for kind, key, _ in events:
        running[key] = running.get(key, 0) + (1 if kind == "start" else -1)
        assert running[key] <= 1, "two runs held one mutex key at once"
    assert await client.redis.execute("HLEN", client.keys.mutexes) == 0


async def test_max_concurrency_holds_with_admission_options_too(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    from redflow import WorkflowRateLimitOptions

    live: list[int] = []
    peak = {"n": 0}

    async def handler(ctx: WorkflowHandlerContext) -> int:
        live.append(1)
        peak["n"] = max(peak["n"], len(live))
        await asyncio.sleep(0.05)
        live.pop()
        return ctx.input

    wf = define_workflow("adm-both", handler=handler, max_concurrency=1, registry=registry,
                         throttle=WorkflowRateLimitOptions(key=lambda i: "k", limit=100, period="1m"))
    await make_worker(concurrency=10)
    handles = [await client.enqueue_definition(wf, i) for i in range(6)]
    assert sorted(await asyncio.gather(*(h.result(timeout_ms=20_000) for h in handles))) == list(range(6))
    assert peak["n"] == 1
