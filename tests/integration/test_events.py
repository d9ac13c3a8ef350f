"""Event fan-out, durable event history, and waiting for callbacks."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import pytest

from redflow import (
    EventTrigger,
    ListEventsParams,
    RedflowClient,
    RedflowError,
    WorkflowHandlerContext,
    WorkflowRegistry,
    define_workflow,
)

from ..conftest import wait_until


async def _echo(ctx: WorkflowHandlerContext) -> Any:
    return {"wf": ctx.run.workflow, "input": ctx.input}


async def test_fan_out_history_and_dedupe(client: RedflowClient, registry: WorkflowRegistry, make_worker) -> None:
    define_workflow("billing-sub", handler=_echo, event=[EventTrigger(name="order.created")], registry=registry)
    define_workflow("mail-sub", handler=_echo, queue="mail", event=[EventTrigger(name="order.created")],
                    registry=registry)
    await make_worker(queues=["default", "mail"])
    handles = await client.emit_event("order.created", {"order": 1}, event_id="evt-1")
    outputs = await asyncio.gather(*(h.result(timeout_ms=10_000) for h in handles))
    assert sorted(o["wf"] for o in outputs) == ["billing-sub", "mail-sub"]
    assert all(o["input"] == {"order": 1} for o in outputs)

    again = await client.emit_event("order.created", {"order": 1}, event_id="evt-1")
    assert sorted(h.id for h in again) == sorted(h.id for h in handles)  # explicit event_id deduplicates
    with pytest.raises(RedflowError, match="different content"):
        await client.emit_event("order.created", {"order": 2}, event_id="evt-1")

    event = await client.get_event("evt-1")
    assert event is not None
    assert event["name"] == "order.created" and event["data"] == {"order": 1}
    assert event["fanout_status"] == "completed"
    assert event["subscriber_count"] == 2 and event["delivery_count"] == 2 and event["failed_delivery_count"] == 0
    assert sorted(d["workflow"] for d in event["deliveries"]) == ["billing-sub", "mail-sub"]
    assert event["resumed_run_count"] == 0 and event["resumed_run_ids"] == []

    nobody = await client.emit_event_detailed("nobody.listens", {"x": 1})
    assert nobody["handles"] == [] and nobody["resumed_run_ids"] == []
    record = await client.get_event(nobody["event_id"])
    assert record is not None and record["fanout_status"] == "no-subscribers"

    keyed1 = await client.emit_event_detailed("order.created", {"order": 3}, idempotency_key="k-3")
    keyed2 = await client.emit_event_detailed("order.created", {"order": 3}, idempotency_key="k-3")
    assert keyed1["event_id"] == keyed2["event_id"]

    definitions = await client.list_event_definitions()
    order = next(d for d in definitions if d["event"] == "order.created")
    assert sorted(s["workflow"] for s in order["subscribers"]) == ["billing-sub", "mail-sub"]


async def test_list_events_filters_sorts_and_pages(client: RedflowClient, registry: WorkflowRegistry) -> None:
    await client.store.ensure_ready()
    for i in range(5):
        await client.emit_event("page.test", {"i": i}, event_id=f"page-{i}")
        await asyncio.sleep(0.002)
    await client.emit_event("other.event", None, event_id="other-0")
    newest = await client.list_events(ListEventsParams(name="page.test", limit=2))
    assert [e["id"] for e in newest] == ["page-4", "page-3"]
    more = await client.list_events(ListEventsParams(name="page.test", limit=2, cursor="page-3"))
    assert [e["id"] for e in more] == ["page-2", "page-1"]
    oldest = await client.list_events(ListEventsParams(name="page.test", limit=10, sort="asc"))
    assert [e["id"] for e in oldest] == [f"page-{i}" for i in range(5)]
    everything = await client.list_events(ListEventsParams(limit=50, fanout_status="no-subscribers"))
    assert {"other-0", "page-0"} <= {e["id"] for e in everything}


async def test_wait_for_event_receives_earlier_but_not_pre_creation_events(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    gate = asyncio.Event()

    async def waiter(ctx: WorkflowHandlerContext) -> Any:
        async def hold() -> None:
            await gate.wait()

        await ctx.step.run("hold", hold)
        first = await ctx.step.wait_for_event("approval", "approval.received", ctx.input["order"], "10s")
        second = await ctx.step.wait_for_event("second", "approval.received", ctx.input["order"], "300ms")
        return [first["id"] if first else None, second["id"] if second else None, first["data"] if first else None]

    wf = define_workflow("approval-waiter", handler=waiter, registry=registry)
    await client.emit_event("approval.received", {"stale": True}, correlation_key="ord-1", event_id="before-run")
    await asyncio.sleep(0.005)
    await make_worker()
    handle = await client.enqueue_definition(wf, {"order": "ord-1"})
    await wait_until(lambda: _is(client, handle.id, "running"), what="run started")
    # The callback arrives before the wait is registered: it must not be lost.
    await client.emit_event("approval.received", {"ok": True}, correlation_key="ord-1", event_id="early-callback")
    gate.set()
    assert await handle.result(timeout_ms=10_000) == ["early-callback", None, {"ok": True}]


async def test_one_event_resumes_every_waiting_run(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def waiter(ctx: WorkflowHandlerContext) -> Any:
        event = await ctx.step.wait_for_event("wait", "shipment.arrived", "box-9", "30s")
        return event["data"] if event else None

    wf = define_workflow("box-waiter", handler=waiter, registry=registry)
    await make_worker(concurrency=5)
    handles = [await client.enqueue_definition(wf, None) for _ in range(3)]
    for h in handles:
        await wait_until(lambda h=h: _is(client, h.id, "scheduled"), what="waiting")
    result = await client.emit_event_detailed("shipment.arrived", {"box": 9}, correlation_key="box-9")
    assert sorted(result["resumed_run_ids"]) == sorted(h.id for h in handles)
    assert await asyncio.gather(*(h.result(timeout_ms=10_000) for h in handles)) == [{"box": 9}] * 3
    event = await client.get_event(result["event_id"])
    assert event is not None and event["resumed_run_count"] == 3


async def test_delayed_event_is_delivered_by_the_leader(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    define_workflow("later-sub", handler=_echo, event=[EventTrigger(name="later.event")], registry=registry)
    await make_worker(lease_ms=900)
    result = await client.emit_event_detailed(
        "later.event", {"x": 1}, emit_at=datetime.now() + timedelta(milliseconds=400)
    )
    assert result["handles"] == []
    record = await client.get_event(result["event_id"])
    assert record is not None and record["fanout_status"] == "pending"
    delivered = await wait_until(lambda: _delivered(client, result["event_id"]), timeout_s=10, what="delivery")
    handle = client.make_run_handle(delivered["deliveries"][0]["run_id"])
    assert (await handle.result(timeout_ms=10_000))["input"] == {"x": 1}


async def test_step_emit_event_is_not_repeated_on_replay(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    define_workflow("step-sub", handler=_echo, event=[EventTrigger(name="step.event")], registry=registry)

    async def emitter(ctx: WorkflowHandlerContext) -> Any:
        ids = await ctx.step.emit_event("announce", "step.event", {"from": ctx.run.id})
        await ctx.step.wait_for("pause", "200ms")  # forces a replay of the handler
        return ids

    wf = define_workflow("emitter", handler=emitter, registry=registry)
    await make_worker(concurrency=4)
    handle = await client.enqueue_definition(wf, None)
    ids = await handle.result(timeout_ms=10_000)
    assert len(ids) == 1
    events = await client.list_events(ListEventsParams(name="step.event"))
    assert len(events) == 1 and events[0]["parent_run_id"] == handle.id


async def _delivered(client: RedflowClient, event_id: str) -> dict | None:
    record = await client.get_event(event_id)
    return record if record and record["fanout_status"] == "completed" else None


async def _is(client: RedflowClient, run_id: str, status: str) -> bool:
    state = await client.get_run(run_id)
    return bool(state and state["status"] == status)


async def test_event_contract_enforced_at_emit_and_shown_in_definitions(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    from redflow import InputValidationError
    from redflow.errors import ConfigurationError

    schema = {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}
    define_workflow("contract-sub", handler=_echo, input_schema=schema, event=[EventTrigger(name="paid")],
                    registry=registry)
    await make_worker()
    before = await client.list_events(ListEventsParams(name="paid"))
    with pytest.raises(InputValidationError, match="order_id"):
        await client.emit_event("paid", {"amount": 3})
    assert await client.list_events(ListEventsParams(name="paid")) == before  # nothing written
    handles = await client.emit_event("paid", {"order_id": "o-1"})
    assert (await handles[0].result(timeout_ms=10_000))["input"] == {"order_id": "o-1"}
    definition = next(d for d in await client.list_event_definitions() if d["event"] == "paid")
    assert definition["input_json_schema"] == schema

    other = WorkflowRegistry()
    define_workflow("contract-rival", handler=_echo, input_schema={"type": "string"},
                    event=[EventTrigger(name="paid")], registry=other)
    with pytest.raises(ConfigurationError, match="different input schemas"):
        await make_worker(registry=other)
