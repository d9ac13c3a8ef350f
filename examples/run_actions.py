"""Operating on runs: why a run is stuck, the failures view, retry, replay from a step, bulk cancel.

    python examples/run_actions.py

See docs/run-actions.md. A payment workflow fails while its card service is down; the operator asks
why, groups the failures, retries the run once the service is back (the completed step is not
repeated), replays it from its last step with another amount, and cancels a batch of delayed runs
after counting them with a dry run.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from redflow import (
    BulkQuery,
    RedflowClient,
    StartWorkerOptions,
    WorkflowHandlerContext,
    create_client,
    start_worker,
    workflow,
)
from redflow.embedded import EmbeddedServer

card_service_up = False
calls = {"load-order": 0, "charge": 0}


async def load_order(order_id: str) -> dict[str, object]:
    calls["load-order"] += 1
    return {"order_id": order_id, "cents": 1250}


async def charge(order: dict[str, object], cents: int) -> str:
    calls["charge"] += 1
    if not card_service_up:
        raise ConnectionError("card service unavailable")
    return f"charged {cents} cents for {order['order_id']}"


@workflow("pay-order", max_attempts=1)
async def pay_order(ctx: WorkflowHandlerContext[dict[str, object]]) -> str:
    order = await ctx.step.run("load-order", load_order, ctx.input["order_id"])
    cents = int(str(ctx.input.get("cents", order["cents"])))
    return await ctx.step.run("charge", charge, order, cents)


async def ended(client: RedflowClient, run_id: str) -> str:
    for _ in range(1000):
        state = await client.get_run(run_id)
        if state is not None and state["status"] in ("succeeded", "failed", "canceled"):
            return state["status"]
        await asyncio.sleep(0.01)
    raise RuntimeError(f"run {run_id} did not end")


async def main(url: str) -> None:
    global card_service_up
    client = create_client(url=url)
    queued = await client.enqueue_definition(pay_order, {"order_id": "o-1"})
    print("before any worker:", (await client.explain_run(queued.id))["message"])
    worker = await start_worker(StartWorkerOptions(app="run-actions", url=url))
    try:
        print("first try:", await ended(client, queued.id))
        print("why:", (await client.explain_run(queued.id))["message"].split(" at ")[0])
        for group in await client.list_failures():
            print(f"failures: {group['count']} x {group['error_name']} in step {group['step']!r} ({group['category']})")

        card_service_up = True
        retried = await client.retry_run(queued.id)
        print("retry:", await retried.result(timeout_ms=10_000), "| load-order ran", calls["load-order"], "time")

        replay = await client.replay_run(queued.id, from_step="charge", input={"order_id": "o-1", "cents": 990})
        print("replay from 'charge':", await replay.result(timeout_ms=10_000),
              "| load-order ran", calls["load-order"], "time")

        later = datetime.now(UTC) + timedelta(hours=1)
        await client.enqueue_many(pay_order, [{"order_id": f"o-{n}"} for n in range(2, 7)], run_at=later)
        query: BulkQuery = {"workflow": "pay-order", "status": "scheduled"}
        dry = await client.cancel_runs(query, dry_run=True)
        done = await client.cancel_runs(query, reason="orders withdrawn")
        print(f"bulk cancel: {dry['matched']} matched in the dry run, {done['done']} canceled")
    finally:
        await worker.stop()
        await client.close()


if __name__ == "__main__":
    with EmbeddedServer() as server:
        asyncio.run(main(server.url))
