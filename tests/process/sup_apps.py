"""Workflows for the supervisor tests, registered in the default registry as a user module would.

``client`` is created at import time, before the supervisor forks: every worker must be able to use it.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from redflow import CronTrigger, WorkflowHandlerContext, WorkflowRetryPolicy, create_client, define_workflow

client = create_client(url=os.environ["SUP_TEST_URL"], prefix=os.environ["SUP_TEST_PREFIX"])


async def pid_job(ctx: WorkflowHandlerContext[Any]) -> dict[str, Any]:
    async def body() -> int:
        return int(await client.redis.execute("INCR", f"{client.prefix}:test:count:body:{ctx.run.id}"))

    await ctx.step.run("body", body)
    await asyncio.sleep(float(ctx.input.get("sleep", 0)) if isinstance(ctx.input, dict) else 0)
    return {"pid": os.getpid()}


async def hog(ctx: WorkflowHandlerContext[Any]) -> int:
    ballast = bytearray(64 * 2**20)  # 64 MiB, held while the run sleeps
    await asyncio.sleep(0.5)
    return len(ballast)


async def ticker(ctx: WorkflowHandlerContext[Any]) -> int:
    return os.getpid()


async def blocker(ctx: WorkflowHandlerContext[Any]) -> int:
    """Blocks its worker's event loop on the first try (a handler calling time.sleep)."""
    tries = int(await client.redis.execute("INCR", f"{client.prefix}:test:count:block:{ctx.run.id}"))
    if tries == 1:
        time.sleep(60)  # noqa: ASYNC251 - the point: a handler that blocks the event loop
    return tries


async def plain(ctx: WorkflowHandlerContext[Any]) -> dict[str, Any]:
    return {"pid": os.getpid()}


define_workflow("sup-pid", handler=pid_job)
define_workflow("sup-plain", handler=plain)
define_workflow("sup-hog", handler=hog)
define_workflow("sup-block", handler=blocker)
if os.environ.get("SUP_TEST_CRON"):
    define_workflow("sup-tick", handler=ticker, cron=[CronTrigger("* * * * * *", timezone="UTC", id="sup-tick")])


async def sleepy_retry(ctx: WorkflowHandlerContext[Any]) -> int:
    """Sleeps durably, then fails its first attempt: one run, three executions (start, wake, retry)."""
    await ctx.step.wait_for("nap", 50)
    if ctx.run.attempt == 1:
        raise RuntimeError("first attempt fails")
    return ctx.run.attempt


define_workflow("sup-sleepy-retry", handler=sleepy_retry, retries=WorkflowRetryPolicy(delay=20))
