"""Cron: a six-field trigger (with seconds) that fires a run every second.

    python examples/cron.py

See docs/cron.md. The worker becomes the leader, and the leader fires the trigger's slots; this
script waits for two runs, prints them, and stops. It takes about three seconds.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redflow import (
    CronTrigger,
    ListRunsParams,
    StartWorkerOptions,
    WorkflowHandlerContext,
    create_client,
    set_default_client,
    start_worker,
    workflow,
)
from redflow.embedded import EmbeddedServer
from redflow.ids import run_id_time_ms

EVERY_SECOND = CronTrigger("* * * * * *", timezone="UTC", input={"source": "cron"}, id="tick-every-second")


@workflow("tick", cron=[EVERY_SECOND])
async def tick(ctx: WorkflowHandlerContext[dict[str, Any]]) -> str:
    return f"tick from {ctx.input['source']}"


async def main(url: str) -> None:
    client = create_client(url=url)
    set_default_client(client)
    worker = await start_worker(StartWorkerOptions(app="cron", url=url))
    try:
        runs = []
        for _ in range(100):  # at most ten seconds
            runs = await client.list_runs(ListRunsParams(workflow="tick", sort="asc"))
            if len(runs) >= 2:
                break
            await asyncio.sleep(0.1)
        runs = runs[:2]
        print("the cron trigger fired", len(runs), "runs")
        for run in runs:
            output = await client.make_run_handle(run["id"]).result(timeout_ms=10_000)
            print(" ", output, "| run id carries a whole-second slot:", run_id_time_ms(run["id"]) % 1000 == 0)
        slots = [run_id_time_ms(r["id"]) for r in runs]
        print("two different slots, one run each:", len(set(slots)) == 2)
        meta = await client.get_workflow_meta("tick")
        print("registered trigger:", meta["cron"][0]["expression"] if meta else None)
    finally:
        await worker.stop()
        await client.close()


if __name__ == "__main__":
    with EmbeddedServer() as server:
        asyncio.run(main(server.url))
