"""Durable time: a sleep that frees the worker slot, and a run that starts later.

    python examples/durable_sleep.py

See docs/time.md. One worker with one slot: while a run sleeps, the slot serves another run; then a
run enqueued with ``run_at`` waits half a second before it is claimed.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

from redflow import (
    RedflowClient,
    StartWorkerOptions,
    WorkflowHandlerContext,
    create_client,
    set_default_client,
    start_worker,
    workflow,
)
from redflow.embedded import EmbeddedServer


def now_ms() -> int:
    return int(time.time() * 1000)


@workflow("nap")
async def nap(ctx: WorkflowHandlerContext[None]) -> dict[str, object]:
    before = await ctx.step.run("before", now_ms)  # recorded: a replay gets the same value
    await ctx.step.wait_for("sleep", "300ms")  # the run leaves the worker until the time is up
    after = await ctx.step.run("after", now_ms)
    return {"slept_300ms": after - before >= 300, "attempt": ctx.run.attempt}


@workflow("quick")
async def quick(ctx: WorkflowHandlerContext[None]) -> str:
    return "quick run done"


async def wait_for_status(client: RedflowClient, run_id: str, wanted: str) -> str:
    for _ in range(1000):
        state = await client.get_run(run_id)
        if state is not None and state["status"] == wanted:
            return wanted
        await asyncio.sleep(0.01)
    raise RuntimeError(f"run {run_id} never became {wanted}")


async def main(url: str) -> None:
    client = create_client(url=url)
    set_default_client(client)
    worker = await start_worker(StartWorkerOptions(app="durable-sleep", url=url, concurrency=1))
    try:
        sleeper = await nap.run()
        print("while sleeping the run is", await wait_for_status(client, sleeper.id, "scheduled"))
        print("the single slot served:", await (await quick.run()).result(timeout_ms=5_000))
        asleep = (await client.get_run(sleeper.id) or {}).get("status") == "scheduled"
        print("nap still asleep when the quick run finished:", asleep)
        print("nap ->", await sleeper.result(timeout_ms=10_000))
        for step in await client.get_run_steps(sleeper.id):
            print(f"  step {step['seq']}: {step['name']} ({step.get('kind', 'run')})")

        later = await quick.run(run_at=datetime.now(UTC) + timedelta(milliseconds=500))
        print("delayed run is", (await client.get_run(later.id) or {}).get("status"))
        print("delayed run ->", await later.result(timeout_ms=10_000))
        state = await client.get_run(later.id) or {}
        print("started no earlier than run_at:", state["started_at"] >= state["available_at"])
    finally:
        await worker.stop()
        await client.close()


if __name__ == "__main__":
    with EmbeddedServer() as server:
        asyncio.run(main(server.url))
