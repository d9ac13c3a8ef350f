"""Regressions: resets confined to their own prefix, and cron triggers no live worker can run."""

from __future__ import annotations

import logging
import uuid
from types import SimpleNamespace
from typing import Any

import pytest

from redflow import CronTrigger, RedflowClient, WorkflowHandlerContext, WorkflowRegistry, create_client, define_workflow
from redflow.leader.cron import CronScheduler, cron_records, cron_run_id

from ..partitioned import total

MINUTE = 60_000


async def _noop(ctx: WorkflowHandlerContext) -> Any:
    return ctx.input


async def _prefix_keys(client: RedflowClient) -> list[bytes]:
    found: list[bytes] = []
    for node in await client.redis.masters():  # SCAN is per node on a cluster
        cursor = b"0"
        while True:
            cursor, keys = await node.execute("SCAN", cursor, "MATCH", "*", "COUNT", 1000)
            found += [k for k in keys if k.startswith(f"{client.keys.prefix}:{{".encode())]
            if cursor == b"0":
                break
    return found


# --- 5. reset_state / reset_runs delete their own prefix only, glob characters included -------------
@pytest.mark.parametrize(("special", "lookalike"), [("x[1]", "x1"), ("q?", "qz"), ("s*", "sabc"), ("b\\", "b")])
async def test_reset_touches_only_its_own_prefix(redis_url: str, special: str, lookalike: str) -> None:
    base = f"rft:{uuid.uuid4().hex[:12]}:"
    reg = WorkflowRegistry()
    wf = define_workflow("reset-wf", handler=_noop, registry=reg)
    mine = create_client(url=redis_url, prefix=base + special)
    theirs = create_client(url=redis_url, prefix=base + lookalike)
    try:
        for c in (mine, theirs):
            c.registry = reg
            await c.enqueue_definition(wf, {"from": c.keys.prefix})
            await c.emit_event("reset.event", {"from": c.keys.prefix})
        theirs_before = sorted(await _prefix_keys(theirs))
        assert theirs_before and await _prefix_keys(mine)

        runs_deleted = (await mine.reset_runs())["deleted"]
        assert isinstance(runs_deleted, int) and runs_deleted > 0
        assert await total(mine, lambda k: ("HLEN", k.runs)) == 0  # every partition's runs
        assert sorted(await _prefix_keys(theirs)) == theirs_before

        state_deleted = (await mine.reset_state())["deleted"]
        assert isinstance(state_deleted, int) and state_deleted > 0
        assert await _prefix_keys(mine) == []
        assert sorted(await _prefix_keys(theirs)) == theirs_before
        assert await total(theirs, lambda k: ("HLEN", k.runs)) == 1
    finally:
        await theirs.reset_state()
        await mine.close()
        await theirs.close()


# --- 6. a trigger whose workflow no live worker defines stops firing and is reported ----------------
async def test_trigger_of_a_workflow_no_live_worker_defines_does_not_fire(
    client: RedflowClient, caplog: pytest.LogCaptureFixture
) -> None:
    old, new = WorkflowRegistry(), WorkflowRegistry()
    gone = define_workflow("gone-cron", handler=_noop, cron=[CronTrigger("* * * * *", timezone="UTC", id="gone")],
                           registry=old)
    kept = define_workflow("kept-cron", handler=_noop, cron=[CronTrigger("* * * * *", timezone="UTC", id="kept")],
                           registry=new)
    store, events = client.store, client.events
    await store.ensure_ready()
    sec, usec = await client.redis.execute_at(client.keys.base, "TIME")
    now = int(sec) * 1000 + int(usec) // 1000
    slot = now - now % MINUTE
    # The old build (the only one defining "gone-cron") registered long ago; its worker is gone.
    await events.register({gone.name: gone.meta()}, {}, cron_records([gone]), now - 30 * MINUTE)
    await events.record_registration("w-old", [gone.name], None, now - 30 * MINUTE)
    # The build running now has dropped "gone-cron"; its worker is live.
    await store.heartbeat("w-new", 60_000, 60_000, False)
    await events.register({kept.name: kept.meta()}, {}, cron_records([kept]), now - 30 * MINUTE)
    await events.record_registration("w-new", [kept.name], None, now - 30 * MINUTE)
    await client.redis.execute("HSET", client.keys.cron_last, "gone", slot - MINUTE, "kept", slot - MINUTE)

    scheduler = CronScheduler(SimpleNamespace(client=client, store=store))  # type: ignore[arg-type]
    await scheduler.reload()
    with caplog.at_level(logging.WARNING, logger="redflow.cron"):
        assert await scheduler.fire_due(now_ms=now) == 1
        assert await scheduler.fire_due(now_ms=now + 1) == 0
    scheduler.stop()
    assert await client.get_run(cron_run_id("kept", slot, client.keys.partition)) is not None
    assert await client.get_run(cron_run_id("gone", slot, client.keys.partition)) is None
    warnings = [r.getMessage() for r in caplog.records if "gone" in r.getMessage()]
    assert len(warnings) == 1 and "'gone-cron'" in warnings[0] and "no live worker" in warnings[0]
    triggers = {t["id"]: t for t in await client.list_cron_triggers()}
    assert triggers["gone"]["orphaned"] is True and triggers["gone"]["orphaned_since"] == slot
    assert triggers["kept"]["orphaned"] is False and triggers["kept"]["orphaned_since"] is None

    # A worker that defines the workflow starts again: the trigger is no longer orphaned and fires.
    await store.heartbeat("w-back", 60_000, 60_000, False)
    await events.register({gone.name: gone.meta()}, {}, cron_records([gone]), now)
    await events.record_registration("w-back", [gone.name], None, now)
    assert {t["id"]: t["orphaned"] for t in await client.list_cron_triggers()} == {"gone": False, "kept": False}
    revived = CronScheduler(SimpleNamespace(client=client, store=store))  # type: ignore[arg-type]
    await revived.reload()
    assert await revived.fire_due(now_ms=now) == 1
    revived.stop()
    assert await client.get_run(cron_run_id("gone", slot, client.keys.partition)) is not None


async def test_registrations_forget_workers_that_are_gone(client: RedflowClient) -> None:
    reg = WorkflowRegistry()
    wf = define_workflow("reg-cron", handler=_noop, cron=[CronTrigger("* * * * *", timezone="UTC", id="reg")],
                         registry=reg)
    store, events = client.store, client.events
    await store.ensure_ready()
    sec, _ = await client.redis.execute_at(client.keys.base, "TIME")
    now = int(sec) * 1000
    assert await events.live_workflows(now) is None  # nothing recorded: no evidence, triggers fire
    await events.register({wf.name: wf.meta()}, {}, cron_records([wf]), now - 120 * MINUTE)
    await events.record_registration("w-1", [wf.name], None, now - 120 * MINUTE)
    assert await events.live_workflows(now) == set()  # w-1 never showed up as a live worker
    await store.heartbeat("w-1", 60_000, 60_000, False)
    assert await events.live_workflows(now) == {"reg-cron"}
    await store.resign("w-1")
    await events.register({}, {}, {}, now)
    await events.record_registration("w-2", [], None, now)  # a later start forgets w-1 (gone, and old)
    raw = await client.redis.execute("HKEYS", events.registrations_key)
    assert sorted(k.decode() for k in raw) == ["w-2"]
    assert await events.live_workflows(now) == set()  # w-2 is starting (grace) and defines nothing
