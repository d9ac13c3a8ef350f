"""Workflows the browser tests run for real: a shop with payments that fail in several ways, a nightly
report with a child, a stream and a cron trigger, an event subscriber behind limits, and a run that
waits for an approval event."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from redflow import (
    CronTrigger,
    EventTrigger,
    NonRetriableError,
    RedflowClient,
    RunFailedError,
    WorkflowHandlerContext,
    WorkflowRateLimitOptions,
    WorkflowRegistry,
    WorkflowRetryPolicy,
    define_workflow,
)


@dataclass
class Shop:
    """What the step bodies did, so a test can tell a recorded step from one that ran again."""

    calls: Counter[str] = field(default_factory=Counter)
    carrier_down: bool = True


def define_shop(registry: WorkflowRegistry, shop: Shop) -> None:
    async def charge_card(ctx: WorkflowHandlerContext) -> dict[str, Any]:
        amount = ctx.input["amount"]

        def fetch_customer() -> dict[str, Any]:
            shop.calls["fetch-customer"] += 1
            return {"customer": ctx.input["customer"], "tier": "gold"}

        def charge() -> dict[str, Any]:
            shop.calls["charge"] += 1
            if amount < 0:
                raise NonRetriableError(f"refusing a negative amount {amount}")
            if amount == 13:
                raise RuntimeError(f"card declined by issuer (amount {amount})")
            return {"charged": amount, "currency": "EUR"}

        customer = await ctx.step.run("fetch-customer", fetch_customer)
        receipt = await ctx.step.run("charge", charge)
        return {**customer, **receipt}

    async def ship_order(ctx: WorkflowHandlerContext) -> dict[str, Any]:
        def reserve() -> dict[str, Any]:
            shop.calls["reserve"] += 1
            return {"slot": "A-7", "order": ctx.input["order"]}

        def ship() -> dict[str, Any]:
            shop.calls["ship"] += 1
            if shop.carrier_down:
                raise RuntimeError("carrier API unreachable: connection refused")
            return {"tracking": f"TRK-{ctx.input['order']}"}

        slot = await ctx.step.run("reserve", reserve)
        label = await ctx.step.run("ship", ship)
        return {**slot, **label}

    async def render_page(ctx: WorkflowHandlerContext) -> dict[str, Any]:
        await ctx.step.wait_for("let-cache-warm", "30ms")
        return {"page": ctx.input, "bytes": 2048}

    async def nightly_report(ctx: WorkflowHandlerContext) -> dict[str, Any]:
        rows = await ctx.step.run("query-sales", lambda: [{"day": "mon", "total": 1200}, {"day": "tue", "total": 900}])
        assert ctx.stream is not None
        await ctx.stream.write({"progress": 50, "rows": len(rows)})
        page = await ctx.step.run_workflow("render", registry.get("render-page"), "sales")
        await ctx.stream.write({"progress": 100})
        return {"rows": len(rows), "page": page}

    async def on_order_paid(ctx: WorkflowHandlerContext) -> dict[str, Any]:
        return await ctx.step.run("notify-warehouse", lambda: {"notified": ctx.input.get("order")})

    async def await_approval(ctx: WorkflowHandlerContext) -> Any:
        return await ctx.step.wait_for_event("approval", "refund.approved", ctx.input["refund"], "1h")

    async def send_digest(ctx: WorkflowHandlerContext) -> str:
        return "sent"

    fast_retry = WorkflowRetryPolicy(max_attempts=2, delay=20)
    define_workflow("charge-card", handler=charge_card, retries=fast_retry, registry=registry)
    define_workflow("ship-order", handler=ship_order, retries=fast_retry, queue="fulfilment", registry=registry)
    define_workflow("render-page", handler=render_page, registry=registry)
    define_workflow("nightly-report", handler=nightly_report, stream=True, cron=[CronTrigger("0 3 * * *")],
                    registry=registry)
    define_workflow("on-order-paid", handler=on_order_paid, event=[EventTrigger("order.paid")], max_concurrency=4,
                    throttle=WorkflowRateLimitOptions(key=lambda _: "warehouse", limit=50, period="1s"),
                    registry=registry)
    define_workflow("await-approval", handler=await_approval, registry=registry)
    define_workflow("send-digest", handler=send_digest, queue="mail", registry=registry)


async def settle(client: RedflowClient, run_ids: list[str], timeout_ms: int = 15_000) -> None:
    """Wait until every run has ended (failures included)."""
    async def one(run_id: str) -> None:
        try:
            await client.make_run_handle(run_id).result(timeout_ms=timeout_ms)
        except RunFailedError:
            pass

    await asyncio.gather(*(one(r) for r in run_ids))


async def populate(client: RedflowClient, registry: WorkflowRegistry) -> dict[str, Any]:
    """Real runs of every kind; a worker must be running. Returns the interesting run ids."""
    charge = registry.get("charge-card")
    assert charge is not None
    ok = [await client.enqueue_definition(charge, {"customer": f"cus_{i}", "amount": 20 + i}) for i in range(6)]
    declined = [await client.enqueue_definition(charge, {"customer": "cus_unlucky", "amount": 13}) for _ in range(3)]
    negative = await client.enqueue_definition(charge, {"customer": "cus_typo", "amount": -5})
    report = await client.run_by_name("nightly-report", None)
    waiting = await client.run_by_name("await-approval", {"refund": "rf_1"})
    emitted = await client.emit_event_detailed("order.paid", {"order": "ord_42", "total": 99.5},
                                               correlation_key="ord_42")
    paid = [h.id for h in emitted["handles"]]
    await settle(client, [h.id for h in (*ok, *declined, negative, report)] + paid)
    return {
        "ok": ok[0].id, "declined": declined[0].id, "negative": negative.id, "report": report.id,
        "waiting": waiting.id, "event": emitted["event_id"], "paid": paid[0],
    }
