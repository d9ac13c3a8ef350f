"""The workflows the redflow scenarios run, in a registry of their own (shared by client and worker)."""

from __future__ import annotations

from typing import Any

from redflow import EventTrigger, WorkflowHandlerContext, WorkflowRegistry, define_workflow

QUEUE = "bench"
registry = WorkflowRegistry()


async def _echo(ctx: WorkflowHandlerContext[Any]) -> Any:
    return ctx.input


async def _identity(x: Any) -> Any:
    return x


async def _three_steps(ctx: WorkflowHandlerContext[Any]) -> Any:
    a = await ctx.step.run("a", _identity, ctx.input)
    b = await ctx.step.run("b", _identity, a)
    return await ctx.step.run("c", _identity, b)


echo = define_workflow("bench-echo", handler=_echo, queue=QUEUE, registry=registry)
three_step = define_workflow("bench-three-step", handler=_three_steps, queue=QUEUE, registry=registry)

WORKFLOWS = {"echo": echo, "three_step": three_step}


async def _sleeper(ctx: WorkflowHandlerContext[Any]) -> Any:
    """Sleeps durably for ``ms``; returns when it woke (unix ms, this machine's clock)."""
    import time

    await ctx.step.wait_for("nap", ctx.input["ms"])
    return int(time.time() * 1000)


async def _timer(ctx: WorkflowHandlerContext[Any]) -> Any:
    """Sleeps durably until ``at`` (unix ms); returns when it woke (unix ms, this machine's clock)."""
    import time
    from datetime import UTC, datetime

    await ctx.step.wait_for("nap", datetime.fromtimestamp(ctx.input["at"] / 1000, tz=UTC))
    return int(time.time() * 1000)


async def _wait_for_cancel(ctx: WorkflowHandlerContext[Any]) -> Any:
    import asyncio

    await asyncio.Event().wait()  # runs until canceled


async def _subscriber(ctx: WorkflowHandlerContext[Any]) -> Any:
    return ctx.input


sleeper = define_workflow("bench-sleeper", handler=_sleeper, queue=QUEUE, registry=registry)
timer = define_workflow("bench-timer", handler=_timer, queue=QUEUE, registry=registry)
cancelable = define_workflow("bench-cancelable", handler=_wait_for_cancel, queue=QUEUE, registry=registry)
FANOUT_EVENT = "bench.fanout"
for _i in range(10):
    define_workflow(f"bench-subscriber-{_i}", handler=_subscriber, queue=QUEUE, registry=registry,
                    event=[EventTrigger(name=FANOUT_EVENT)])

WORKFLOWS.update({"sleeper": sleeper, "timer": timer, "cancelable": cancelable})

HANDOFF_EVENT = "bench.handoff"


async def _event_waiter(ctx: WorkflowHandlerContext[Any]) -> Any:
    got = await ctx.step.wait_for_event("wait", HANDOFF_EVENT, ctx.input, timeout=120_000)
    return None if got is None else got["data"]


event_waiter = define_workflow("bench-event-waiter", handler=_event_waiter, queue=QUEUE, registry=registry)


async def _limited_child(ctx: WorkflowHandlerContext[Any]) -> Any:
    return ctx.input


# A limit it never reaches: under a partitioned prefix its runs live in p0, so a parent in another
# partition starts it and awaits it across partitions (two hand-offs).
limited_child = define_workflow("bench-limited-child", handler=_limited_child, queue=QUEUE, registry=registry,
                                max_concurrency=100_000)


async def _child_parent(ctx: WorkflowHandlerContext[Any]) -> Any:
    return await ctx.step.run_workflow("kid", limited_child, ctx.input)


child_parent = define_workflow("bench-child-parent", handler=_child_parent, queue=QUEUE, registry=registry)
