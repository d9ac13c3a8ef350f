"""Workflows run by worker subprocesses in the process tests.

Step bodies count their executions in Redis (``<prefix>:test:count:<name>``) so a test can prove that a
recorded step never ran twice, whichever process ran it.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from redflow import WorkflowHandlerContext, WorkflowRegistry, define_workflow
from redflow.client import get_default_client

registry = WorkflowRegistry()


async def _count(name: str) -> int:
    client = get_default_client()
    return int(await client.redis.execute("INCR", f"{client.prefix}:test:count:{name}"))


async def _mark(key: str, value: str) -> None:
    client = get_default_client()
    await client.redis.execute("SET", f"{client.prefix}:test:{key}", value)


async def kill_after_first_step(ctx: WorkflowHandlerContext[Any]) -> dict[str, Any]:
    async def first() -> int:
        return await _count(f"first:{ctx.run.id}")

    async def second() -> int:
        return await _count(f"second:{ctx.run.id}")

    await ctx.step.run("first", first)
    if await _count(f"attempt-body:{ctx.run.id}") == 1:
        # First execution: the step is recorded; die before finishing the run.
        os.kill(os.getpid(), signal.SIGKILL)
    await ctx.step.run("second", second)
    return {"pid": os.getpid()}


async def kill_always(ctx: WorkflowHandlerContext[Any]) -> None:
    await _count(f"kill-always:{ctx.run.id}")
    os.kill(os.getpid(), signal.SIGKILL)


async def crash_hook(ctx: Any) -> None:
    await _count(f"on-failure:{ctx.run.id}")
    await _mark(f"on-failure-kind:{ctx.run.id}", str(getattr(ctx.error, "kind", "")))


async def record_pid(ctx: WorkflowHandlerContext[Any]) -> dict[str, Any]:
    async def body() -> int:
        return await _count(f"body:{ctx.run.id}")

    await ctx.step.run("body", body)
    return {"pid": os.getpid()}


define_workflow("kill-after-first-step", handler=kill_after_first_step, registry=registry)
define_workflow("kill-always", handler=kill_always, on_failure=crash_hook, max_attempts=5, registry=registry)
define_workflow("record-pid", handler=record_pid, registry=registry)


async def slow_step(ctx: WorkflowHandlerContext[Any]) -> dict[str, Any]:
    async def body() -> int:
        await _count(f"slow-body:{ctx.run.id}")
        await _mark(f"slow-started:{ctx.run.id}:{os.getpid()}", "1")
        await asyncio.sleep(ctx.input.get("sleep", 1.0))
        return os.getpid()

    pid = await ctx.step.run("slow", body)
    return {"step_pid": pid, "pid": os.getpid()}


define_workflow("slow-step", handler=slow_step, registry=registry)


async def durable_sleeper(ctx: WorkflowHandlerContext[Any]) -> str:
    async def before() -> int:
        return await _count(f"sleeper-before:{ctx.run.id}")

    await ctx.step.run("before", before)
    await ctx.step.wait_for("nap", "1500ms")
    await _count(f"sleeper-after:{ctx.run.id}")
    return "slept"


async def event_waiter(ctx: WorkflowHandlerContext[Any]) -> Any:
    event = await ctx.step.wait_for_event("wait", "proc.callback", ctx.input["key"], "60s")
    await _count(f"waiter-after:{ctx.run.id}")
    return event["data"] if event else None


async def child_sleeper(ctx: WorkflowHandlerContext[Any]) -> str:
    await ctx.step.wait_for("child-nap", "1500ms")
    return "child-done"


async def parent_of_sleeper(ctx: WorkflowHandlerContext[Any]) -> str:
    out = await ctx.step.run_workflow("kid", "child-sleeper", None)
    await _count(f"parent-after:{ctx.run.id}")
    return f"parent:{out}"


define_workflow("durable-sleeper", handler=durable_sleeper, registry=registry)
define_workflow("event-waiter", handler=event_waiter, registry=registry)
define_workflow("child-sleeper", handler=child_sleeper, registry=registry)
define_workflow("parent-of-sleeper", handler=parent_of_sleeper, registry=registry)


async def mutex_job(ctx: WorkflowHandlerContext[Any]) -> str:
    if ctx.input.get("die") and await _count(f"mutex-die:{ctx.run.id}") == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # dies while holding the mutex
    await _count(f"mutex-done:{ctx.run.id}")
    return ctx.input["n"]


define_workflow("mutex-job", handler=mutex_job, mutex=lambda i: "shared", registry=registry)
