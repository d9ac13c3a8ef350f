"""Cancellation of a running run, of a parent together with its child, and of a run not started yet.

Run it with ``python examples/cancellation.py``; see docs/cancellation.md."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from redflow import (
    CanceledError,
    RedflowClient,
    StartWorkerOptions,
    WorkflowHandlerContext,
    create_client,
    set_default_client,
    start_worker,
    workflow,
)
from redflow.embedded import EmbeddedServer

seen: dict[str, Any] = {"started": asyncio.Event(), "hooks": 0}


async def long_work(*, signal: asyncio.Event) -> str:
    seen["signal"] = signal  # redflow sets it when the run is canceled
    seen["started"].set()
    await asyncio.sleep(60)
    return "finished"


@workflow("export", on_failure=lambda ctx: seen.update(hooks=seen["hooks"] + 1))
async def export(ctx: WorkflowHandlerContext[None]) -> str:
    return await ctx.step.run("work", long_work)


@workflow("parent")
async def parent(ctx: WorkflowHandlerContext[None]) -> None:
    await ctx.step.run_workflow("child", export)  # waits (slot freed) while the child runs


async def outcome(client: RedflowClient, run_id: str) -> str:
    try:
        return str(await client.make_run_handle(run_id).result(timeout_ms=10_000))
    except CanceledError as exc:  # the message ends with the reason given to cancel_run
        return "CanceledError: " + str(exc).split(": ", 2)[-1]


async def main(url: str) -> None:
    client = create_client(url=url)
    set_default_client(client)
    worker = await start_worker(StartWorkerOptions(app="cancel", url=url, concurrency=4))
    try:
        running = await export.run()
        await asyncio.wait_for(seen["started"].wait(), 10)
        print("cancel running run:", await client.cancel_run(running.id, reason="user pressed stop"))
        print("  result():", await outcome(client, running.id))
        print("  step signal set:", seen["signal"].is_set(), "| on_failure calls:", seen["hooks"])

        top = await parent.run()
        steps: list[Any] = []
        while not steps or steps[0]["status"] != "running":  # until the parent waits for its child
            await asyncio.sleep(0.01)
            steps = await client.get_run_steps(top.id)
        print("cancel parent:", await client.cancel_run(top.id, reason="batch aborted"))
        print("  parent result():", await outcome(client, top.id))
        print("  child result():", (await outcome(client, steps[0]["child_run_id"])).replace(top.id, "<parent id>"))

        later = await export.run(run_at=datetime.now(UTC) + timedelta(hours=1))
        print("cancel scheduled run:", await client.cancel_run(later.id), "| again:", await client.cancel_run(later.id))
    finally:
        await worker.stop()
        await client.close()


if __name__ == "__main__":
    with EmbeddedServer() as server:
        asyncio.run(main(server.url))
