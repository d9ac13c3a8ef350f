"""Cron triggers: exactly one run per slot across racing leaders, catch-up, and real firing."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from redflow import CronTrigger, RedflowClient, WorkflowHandlerContext, WorkflowRegistry, define_workflow
from redflow.errors import ConfigurationError
from redflow.ids import run_id_time_ms
from redflow.leader.cron import CronScheduler, cron_records, cron_run_id, trigger_id
from redflow.storage.codes import Code
from redflow.storage.index import index_prefixes

from ..conftest import wait_until

MINUTE = 60_000


async def _noop(ctx: WorkflowHandlerContext) -> Any:
    return ctx.input


async def _runs_of(client: RedflowClient, workflow: str) -> list[str]:
    return await client.store.index.merged_page(index_prefixes(None, workflow), None, 100_000, False)


async def test_two_leaders_racing_over_100_slots_fire_exactly_100_runs(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    wf = define_workflow("race-cron", handler=_noop, cron=[CronTrigger("* * * * *", timezone="UTC", id="race")],
                         registry=registry)
    await client.store.ensure_ready()
    record = cron_records([wf])["race"]
    base = 1_700_000_040_000 - 1_700_000_040_000 % MINUTE
    slots = [base + i * MINUTE for i in range(100)]

    async def leader() -> list[Code]:
        return [
            await client.events.cron_fire("race", slot, cron_run_id("race", slot, "p0"), record) for slot in slots
        ]

    a, b = await asyncio.gather(leader(), leader())
    assert sum(c is Code.CREATED for c in a + b) == 100
    runs = await _runs_of(client, "race-cron")
    assert len(runs) == 100
    assert sorted(runs) == sorted(cron_run_id("race", s, "p0") for s in slots)  # deterministic ids
    # A redeploy or a later leader replaying old slots changes nothing.
    assert {await client.events.cron_fire("race", s, cron_run_id("race", s, "p0"), record) for s in slots} == {
        Code.EXISTING
    }


async def test_catch_up_fires_only_the_most_recent_missed_slot(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    wf = define_workflow("catchup-cron", handler=_noop, cron=[CronTrigger("*/5 * * * *", timezone="UTC",
                         id="catchup", input={"src": "cron"})], registry=registry)
    await client.store.ensure_ready()
    scheduler = CronScheduler(SimpleNamespace(client=client, store=client.store))  # type: ignore[arg-type]
    start = 1_700_000_100_000 - 1_700_000_100_000 % (5 * MINUTE)
    scheduler._triggers = cron_records([wf])
    scheduler._last = {"catchup": start}
    # The leader was away for 23 minutes: four slots were missed; only the latest fires.
    now = start + 23 * MINUTE
    assert await scheduler.fire_due(now_ms=now) == 1
    assert await scheduler.fire_due(now_ms=now + 1000) == 0
    runs = await _runs_of(client, "catchup-cron")
    assert runs == [cron_run_id("catchup", start + 20 * MINUTE, "p0")]
    state = await client.get_run(runs[0])
    assert state is not None and state["input"] == {"src": "cron"}
    scheduler.stop()


async def test_six_field_cron_fires_every_second_end_to_end(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    define_workflow("every-second", handler=_noop, cron=[CronTrigger("* * * * * *", timezone="UTC")],
                    registry=registry)
    worker = await make_worker()
    await wait_until(lambda: worker.is_leader, what="leadership")
    runs = await wait_until(lambda: _at_least(client, "every-second", 3), timeout_s=15, what="three fires")
    slots = sorted(run_id_time_ms(r) for r in runs)
    assert all(slot % 1000 == 0 for slot in slots), "each run belongs to a one-second slot"
    assert len(set(slots)) == len(slots), "no slot fired twice"
    await worker.stop()
    handles = [client.make_run_handle(r) for r in runs]
    assert all(state and state["workflow"] == "every-second" for state in
               [await h.get_state() for h in handles])
    assert trigger_id("every-second", CronTrigger("* * * * * *", timezone="UTC")) in await _trigger_ids(client)


async def _at_least(client: RedflowClient, workflow: str, n: int) -> list[str] | None:
    runs = await _runs_of(client, workflow)
    return runs if len(runs) >= n else None


async def _trigger_ids(client: RedflowClient) -> list[str]:
    return [k.decode() for k in await client.redis.execute("HKEYS", client.keys.crons)]


def test_invalid_cron_is_a_clear_error_at_definition() -> None:
    reg = WorkflowRegistry()
    with pytest.raises(ConfigurationError, match="5 or 6 fields"):
        define_workflow("bad-cron", handler=_noop, cron=[CronTrigger("* *")], registry=reg)
    with pytest.raises(ConfigurationError, match="invalid cron expression"):
        define_workflow("bad-cron", handler=_noop, cron=[CronTrigger("99 * * * *")], registry=reg)
    with pytest.raises(ConfigurationError, match="unknown cron timezone"):
        define_workflow("bad-cron", handler=_noop, cron=[CronTrigger("* * * * *", timezone="Mars/Base")],
                        registry=reg)


async def test_cron_slot_skipped_when_workflow_at_max_concurrency(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    wf = define_workflow("busy-cron", handler=_noop, max_concurrency=1,
                         cron=[CronTrigger("* * * * *", timezone="UTC", id="busy")], registry=registry)
    store = client.store
    await client.enqueue_definition(wf, None)
    await store.heartbeat("w", 60_000, 60_000, False)
    _, _, runs = await store.claim("w", ["default"], 1, 10)
    assert len(runs) == 1  # one run of the workflow is running: it is at its limit
    scheduler = CronScheduler(SimpleNamespace(client=client, store=store))  # type: ignore[arg-type]
    record = cron_records([wf])["busy"]
    slot = 1_700_000_040_000 - 1_700_000_040_000 % MINUTE
    assert await scheduler.fire_slot("busy", slot, record) is Code.OK  # skipped, and recorded as handled
    assert scheduler.skipped == 1
    assert await scheduler.fire_slot("busy", slot, record) is Code.EXISTING
    assert len(await _runs_of(client, "busy-cron")) == 1
