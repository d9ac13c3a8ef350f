"""Workflows and processes for tests/process/test_run_actions_processes.py.

``python -m tests.process.actions_apps worker URL PREFIX QUEUES LEASE_MS``: a worker process serving
``registry`` on the comma-separated QUEUES until SIGTERM; prints ``ready`` once started.

``python -m tests.process.actions_apps bulk URL PREFIX JOB_ID BATCH KILL_AFTER``: an operator's process
running ``retry_runs`` of the failed runs of ``act-proc-fail`` in batches of BATCH under JOB_ID; it
SIGKILLs itself when the KILL_AFTER-th retry script has answered (0: never), so it dies in the middle of
a batch. Prints the result as JSON when it finishes.

Step bodies and hooks count their executions in Redis (``<prefix>:test:count:<name>``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from typing import Any

from redflow import (
    NonRetriableError,
    StartWorkerOptions,
    WorkflowHandlerContext,
    WorkflowRegistry,
    create_client,
    define_workflow,
    set_default_client,
    start_worker,
)
from redflow.client import get_default_client

registry = WorkflowRegistry()
BULK_QUERY = {"workflow": "act-proc-fail", "status": "failed"}


async def _count(name: str) -> int:
    client = get_default_client()
    return int(await client.redis.execute("INCR", f"{client.prefix}:test:count:{name}"))


async def always_fail(ctx: WorkflowHandlerContext[Any]) -> None:
    raise NonRetriableError(f"attempt {ctx.run.attempt} fails")


async def kill_always(ctx: WorkflowHandlerContext[Any]) -> None:
    await _count(f"kill:{ctx.run.id}")
    os.kill(os.getpid(), signal.SIGKILL)


async def count_hook(ctx: Any) -> None:
    await _count(f"hook:{ctx.run.id}")
    await _count(f"hook:{ctx.run.id}:{getattr(ctx.error, 'kind', '')}")


async def kill_on_retry(ctx: WorkflowHandlerContext[Any]) -> dict[str, Any]:
    async def a() -> int:
        return await _count(f"a:{ctx.run.id}")

    async def b() -> int:
        n = await _count(f"b:{ctx.run.id}")
        if ctx.run.attempt == 1:
            raise NonRetriableError("the first attempt fails for good")
        return n

    async def c() -> int:
        return await _count(f"c:{ctx.run.id}")

    await ctx.step.run("a", a)
    await ctx.step.run("b", b)
    if await _count(f"killpoint:{ctx.run.id}") == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # the retried attempt's worker dies after step b
    await ctx.step.run("c", c)
    return {"attempt": ctx.run.attempt, "pid": os.getpid()}


define_workflow("act-proc-fail", handler=always_fail, registry=registry, max_attempts=1)
define_workflow("act-proc-kill-always", handler=kill_always, registry=registry, on_failure=count_hook,
                queue="doomed", max_attempts=2)
define_workflow("act-proc-kill-on-retry", handler=kill_on_retry, registry=registry, queue="doomed")


async def serve(url: str, prefix: str, queues: list[str], lease_ms: int) -> None:
    set_default_client(create_client(url=url, prefix=prefix))
    worker = await start_worker(StartWorkerOptions(
        app="actions-proc-test", url=url, prefix=prefix, registry=registry, queues=queues, concurrency=10,
        lease_ms=lease_ms, grace_period_ms=2000,
    ))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await worker.stop()


async def bulk(url: str, prefix: str, job_id: str, batch: int, kill_after: int) -> None:
    from redflow.client import actions

    actions.BULK_BATCH = batch
    client = create_client(url=url, prefix=prefix)
    real = client.store.requeue
    answered = 0

    async def requeue(run_id: str, header: Any, token: str = "") -> Any:
        nonlocal answered
        reply = await real(run_id, header, token)
        answered += 1
        if answered == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        return reply

    client.store.requeue = requeue  # type: ignore[method-assign]
    result = await client.retry_runs(BULK_QUERY, job_id=job_id)  # type: ignore[arg-type]
    print(json.dumps(result), flush=True)
    await client.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    mode, url, prefix = sys.argv[1], sys.argv[2], sys.argv[3]
    if mode == "worker":
        asyncio.run(serve(url, prefix, sys.argv[4].split(","), int(sys.argv[5])))
    else:
        asyncio.run(bulk(url, prefix, sys.argv[4], int(sys.argv[5]), int(sys.argv[6])))
