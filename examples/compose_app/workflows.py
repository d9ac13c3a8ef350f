"""The example app the compose file and the Kubernetes manifests run.

    python -m redflow.supervisor --import workflows      (with this directory on PYTHONPATH)

One workflow, ``process-order``, on the ``orders`` queue: three durable steps. The step bodies are
stand-ins for real calls (stock service, payment provider, mailer); each one is recorded once, so a
worker that dies after ``charge-card`` resumes at ``send-receipt`` without charging twice.
"""

from __future__ import annotations

import hashlib
from typing import Any

from redflow import WorkflowHandlerContext, workflow

QUEUE = "orders"


def reserve_stock(order_id: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    units = sum(int(item.get("qty", 1)) for item in items)
    return {"reservation": f"res-{order_id}", "units": units}


def charge_card(order_id: str, amount_cents: int) -> dict[str, Any]:
    # A payment provider would take order_id as its idempotency key; here we derive a stable charge id.
    charge = hashlib.sha256(f"{order_id}:{amount_cents}".encode()).hexdigest()[:16]
    return {"charge_id": f"ch_{charge}", "amount_cents": amount_cents}


async def send_receipt(email: str, charge_id: str) -> dict[str, Any]:
    return {"to": email, "charge_id": charge_id, "sent": True}


@workflow("process-order", queue=QUEUE, max_attempts=5)
async def process_order(ctx: WorkflowHandlerContext[dict[str, Any]]) -> dict[str, Any]:
    order = ctx.input
    items = order.get("items", [])
    amount = sum(int(item.get("qty", 1)) * int(item["price_cents"]) for item in items)
    stock = await ctx.step.run("reserve-stock", reserve_stock, order["order_id"], items)
    charge = await ctx.step.run("charge-card", charge_card, order["order_id"], amount)
    receipt = await ctx.step.run("send-receipt", send_receipt, order["email"], charge["charge_id"])
    return {
        "order_id": order["order_id"],
        "units": stock["units"],
        "charged_cents": charge["amount_cents"],
        "receipt_sent": receipt["sent"],
    }
