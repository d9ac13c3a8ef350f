"""Events: fan-out to subscribed workflows, the event history, and a run waiting for a callback.

    python examples/events.py

See docs/events.md.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redflow import (
    EventTrigger,
    ListEventsParams,
    StartWorkerOptions,
    WorkflowHandlerContext,
    create_client,
    set_default_client,
    start_worker,
    workflow,
)
from redflow.embedded import EmbeddedServer


@workflow("send-receipt", event=[EventTrigger(name="order.placed")])
async def send_receipt(ctx: WorkflowHandlerContext[dict[str, int]]) -> str:
    return f"receipt for order {ctx.input['order']}"


@workflow("reserve-stock", event=[EventTrigger(name="order.placed")])
async def reserve_stock(ctx: WorkflowHandlerContext[dict[str, int]]) -> str:
    return f"stock reserved for order {ctx.input['order']}"


@workflow("await-payment")
async def await_payment(ctx: WorkflowHandlerContext[dict[str, str]]) -> Any:
    event = await ctx.step.wait_for_event("paid", "payment.settled", ctx.input["order"], "30s")
    return None if event is None else event["data"]


async def main(url: str) -> None:
    client = create_client(url=url)
    set_default_client(client)
    worker = await start_worker(StartWorkerOptions(app="events", url=url, concurrency=4))
    try:
        handles = await client.emit_event("order.placed", {"order": 7}, event_id="order-7")
        print("fan-out:", sorted([await h.result(timeout_ms=10_000) for h in handles]))
        again = await client.emit_event("order.placed", {"order": 7}, event_id="order-7")
        print("same event_id, same runs:", sorted(h.id for h in again) == sorted(h.id for h in handles))

        first = await client.emit_event_detailed("order.placed", {"order": 8}, idempotency_key="checkout-8")
        second = await client.emit_event_detailed("order.placed", {"order": 8}, idempotency_key="checkout-8")
        print("same idempotency_key, same event:", first["event_id"] == second["event_id"])

        event = await client.get_event("order-7")
        assert event is not None
        print("event order-7:", event["fanout_status"], event["data"], "deliveries:", event["delivery_count"])
        listed = await client.list_events(ListEventsParams(name="order.placed", limit=10))
        print("history:", [(e["name"], e["fanout_status"], e["subscriber_count"]) for e in listed])

        waiting = await await_payment.run({"order": "order-7"})
        for _ in range(1000):  # until the run is parked on its wait
            if (await client.get_run(waiting.id) or {}).get("status") == "scheduled":
                break
            await asyncio.sleep(0.01)
        paid = await client.emit_event_detailed("payment.settled", {"amount": 42}, correlation_key="order-7")
        print("callback resumed the waiting run:", paid["resumed_run_ids"] == [waiting.id])
        print("await-payment ->", await waiting.result(timeout_ms=10_000))
    finally:
        await worker.stop()
        await client.close()


if __name__ == "__main__":
    with EmbeddedServer() as server:
        asyncio.run(main(server.url))
