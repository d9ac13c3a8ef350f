"""Regressions: exact event payloads, subscriber run ids, name rules, registration order, time bounds."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import redflow.client.facade as client_module
from redflow import (
    EventTrigger,
    ListEventsParams,
    RedflowClient,
    RedflowError,
    WorkflowHandlerContext,
    WorkflowRegistry,
    define_workflow,
)
from redflow.durations import datetime_ms
from redflow.errors import ConfigurationError
from redflow.storage.keys import partition_of

from ..conftest import wait_until

# Values that a decode/encode round trip through Lua's cjson changes: a 64-bit integer (cjson keeps
# 14 significant digits), empty arrays (cjson writes them as objects) and a float's last digits.
EXACT_JSON = '{"big": 123456789012345678, "empty": [], "f": 0.1234567890123456789, "nested": {"a": []}}'
EXACT = json.loads(EXACT_JSON)
RUN_ID = re.compile(r"^[0-9ABCDEFGHJKMNPQRSTVWXYZ]{26}-[^-]+$")


async def _echo_input(ctx: WorkflowHandlerContext) -> Any:
    return ctx.input


async def _status(client: RedflowClient, run_id: str, status: str) -> bool:
    state = await client.get_run(run_id)
    return bool(state and state["status"] == status)


async def _delivered(client: RedflowClient, event_id: str) -> dict[str, Any] | None:
    record = await client.get_event(event_id)
    return record if record and record["fanout_status"] in ("completed", "no-subscribers") else None


async def _resumed(client: RedflowClient, event_id: str) -> dict[str, Any] | None:
    record = await client.get_event(event_id)
    return record if record and record["resumed_run_ids"] else None


def _meta(name: str, schema: Any = None) -> dict[str, Any]:
    return {"name": name, "queue": "default", "max_attempts": 1, "input_json_schema": schema}


# --- 1. delayed events hand subscribers and waiters the exact bytes emitted -------------------------
async def test_delayed_event_delivers_exact_json_to_subscribers_and_waiters(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    define_workflow("exact-sub", handler=_echo_input, max_attempts=1, event=[EventTrigger(name="exact.later")],
                    registry=registry)

    async def waiter(ctx: WorkflowHandlerContext) -> Any:
        event = await ctx.step.wait_for_event("wait", "exact.later", "k-1", "30s")
        return event["data"] if event else "timed out"

    waiting = define_workflow("exact-waiter", handler=waiter, max_attempts=1, registry=registry)
    await make_worker(lease_ms=900)  # heartbeat (and delayed-event delivery) every 300 ms
    handle = await client.enqueue_definition(waiting, None)
    await wait_until(lambda: _status(client, handle.id, "scheduled"), what="waiter suspended")

    result = await client.emit_event_detailed(
        "exact.later", EXACT, correlation_key="k-1", emit_at=datetime.now() + timedelta(milliseconds=300)
    )
    assert result["handles"] == []
    delivered = await wait_until(lambda: _delivered(client, result["event_id"]), what="delayed delivery")
    if len(client.store.partitions) > 1:  # a waiter in another partition is added once its hand-off is applied
        delivered = await wait_until(lambda: _resumed(client, result["event_id"]), what="the hand-off applied")
    assert delivered["resumed_run_ids"] == [handle.id]
    sub_run = delivered["deliveries"][0]["run_id"]
    stored_input = await client.redis.execute("HGET", client.keys.inputs, sub_run)
    assert json.loads(stored_input) == EXACT and b"[]" in stored_input
    assert await client.make_run_handle(sub_run).result(timeout_ms=10_000) == EXACT
    assert await handle.result(timeout_ms=10_000) == EXACT
    event = await client.get_event(result["event_id"])
    assert event is not None and event["data"] == EXACT


# --- 2. every subscriber of an event gets its own run, past 1024 subscribers ------------------------
async def test_more_than_1024_subscribers_each_get_a_distinct_run(client: RedflowClient) -> None:
    await client.store.ensure_ready()
    names = [f"many-{i:04d}" for i in range(1100)]
    now = int(datetime.now().timestamp() * 1000)
    await client.events.register({n: _meta(n) for n in names}, {n: ["many.subs"] for n in names}, {}, now)

    result = await client.emit_event_detailed("many.subs", {"x": 1}, event_id="many-1")
    ids = [h.id for h in result["handles"]]
    assert len(ids) == 1100
    assert len(set(ids)) == 1100, f"{1100 - len(set(ids))} subscribers share a run id"
    assert all(RUN_ID.match(i) and partition_of(i) == client.keys.partition for i in ids)
    assert int(await client.redis.execute("HLEN", client.keys.runs)) == 1100
    workflows = {(await client.get_run(i) or {}).get("workflow") for i in (ids[0], ids[1023], ids[1024], ids[-1])}
    assert workflows == {names[0], names[1023], names[1024], names[-1]}

    again = await client.emit_event_detailed("many.subs", {"x": 1}, event_id="many-1")
    assert [h.id for h in again["handles"]] == ids  # a repeated emit is idempotent
    assert int(await client.redis.execute("HLEN", client.keys.runs)) == 1100


# --- 3. one rule for event names and correlation keys: no leading or trailing whitespace ------------
async def test_emit_refuses_names_and_keys_with_surrounding_whitespace(client: RedflowClient) -> None:
    await client.store.ensure_ready()
    with pytest.raises(ConfigurationError, match="event_name"):
        await client.emit_event(" padded.event", {"x": 1})
    with pytest.raises(ConfigurationError, match="correlation_key"):
        await client.emit_event("padded.event", {"x": 1}, correlation_key="key-1\n")
    with pytest.raises(ConfigurationError, match="event_id"):
        await client.emit_event("padded.event", {"x": 1}, event_id=" evt-1")
    assert await client.list_events(ListEventsParams(limit=10)) == []  # nothing written
    await client.emit_event("padded.event", {"x": 1}, correlation_key="key 1")  # inner spaces are fine


async def test_wait_for_event_refuses_names_and_keys_with_surrounding_whitespace(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def waiter(ctx: WorkflowHandlerContext) -> Any:
        name, key = ctx.input
        return await ctx.step.wait_for_event("wait", name, key, "2s")

    wf = define_workflow("padded-waiter", handler=waiter, max_attempts=1, registry=registry)
    await make_worker()
    bad_name = await client.enqueue_definition(wf, ["padded.event ", "key-1"])
    bad_key = await client.enqueue_definition(wf, ["padded.event", " key-1"])
    with pytest.raises(RedflowError, match="event_name must not have leading or trailing whitespace"):
        await bad_name.result(timeout_ms=10_000)
    with pytest.raises(RedflowError, match="correlation_key must not have leading or trailing whitespace"):
        await bad_key.result(timeout_ms=10_000)


# --- 4. a build refused at registration leaves the registered subscriptions alone -------------------
async def test_refused_registration_keeps_previous_subscriptions(client: RedflowClient) -> None:
    await client.store.ensure_ready()
    events = client.events
    now = int(datetime.now().timestamp() * 1000)
    await events.register({"rival": _meta("rival", {"type": "string"})}, {"rival": ["shared"]}, {}, now)
    await events.register({"a": _meta("a"), "b": _meta("b")}, {"a": ["a.only"], "b": ["b.only"]}, {}, now)
    before = await events.event_definitions()

    # The next build of "a" subscribes to "shared" with a schema that disagrees with "rival"'s.
    with pytest.raises(ConfigurationError, match="different input schemas"):
        await events.register({"a": _meta("a", {"type": "object"})}, {"a": ["shared"]}, {}, now)
    assert await events.event_definitions() == before
    assert [s["workflow"] for s in await events.subscribers_of("a.only")] == ["a"]


# --- 7. times past the supported bound are refused before anything is written -----------------------
FAR = datetime(9999, 1, 1)


async def test_far_future_run_at_and_emit_at_are_refused(client: RedflowClient, registry: WorkflowRegistry) -> None:
    wf = define_workflow("far-future", handler=_echo_input, registry=registry)
    await client.store.ensure_ready()
    with pytest.raises(ConfigurationError, match=r"9999-01-01.*year 5000"):
        await client.run_by_name("far-future", None, run_at=FAR)
    with pytest.raises(ConfigurationError, match=r"9999-01-01.*year 5000"):
        await client.enqueue_definition(wf, None, run_at=FAR)
    previous = client_module._default_client
    client_module.set_default_client(client)
    try:
        with pytest.raises(ConfigurationError, match=r"9999-01-01.*year 5000"):
            await wf.run(None, run_at=FAR)
    finally:
        client_module.set_default_client(previous)
    with pytest.raises(ConfigurationError, match=r"emit_at of event 'far\.event'.*9999-01-01"):
        await client.emit_event("far.event", {"x": 1}, emit_at=FAR)
    for key in (client.keys.runs, client.keys.inputs, client.keys.events, client.keys.event_data):
        assert int(await client.redis.execute("HLEN", key)) == 0, key
    assert int(await client.redis.execute("ZCARD", client.keys.index)) == 0

    # Up to the bound, a scheduled run stays readable, listable and cancelable.
    late = datetime(4999, 12, 31, tzinfo=UTC)
    handle = await client.run_by_name("far-future", {"n": 1}, run_at=late)
    state = await client.get_run(handle.id)
    assert state is not None and state["status"] == "scheduled"
    assert handle.id in [r["id"] for r in await client.list_runs()]
    assert await client.cancel_run(handle.id)
    assert await _status(client, handle.id, "canceled")
    emitted = await client.emit_event_detailed("late.event", {"x": 1}, emit_at=late)
    record = await client.get_event(emitted["event_id"])
    assert record is not None and record["next_process_at"] == datetime_ms(late)


def test_datetime_ms_names_the_argument() -> None:
    with pytest.raises(ConfigurationError, match=r"run_at of workflow 'w'.*9999-01-01"):
        datetime_ms(FAR, "run_at of workflow 'w'")
    with pytest.raises(ConfigurationError, match="9999-12-31"):
        datetime_ms(datetime.max.replace(tzinfo=UTC))
    assert datetime_ms(datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)) == 1000
