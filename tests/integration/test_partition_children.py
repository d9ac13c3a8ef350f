"""Children that live in another partition than their parent: a limited workflow's runs live in p0,
so a parent elsewhere starts its child through its own partition's outbox, and the child's end
reaches the parent through p0's outbox. Every crossing is checked at the moment it can go wrong:
a cancel before the child exists, a cancel between its creation and the recheck, an end that
comes before the parent waits, an applier that never applies, and retention of what is left."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from redflow import (
    RedflowClient,
    SearchRunsParams,
    WorkflowHandlerContext,
    WorkflowRegistry,
    define_workflow,
)
from redflow.errors import CanceledError
from redflow.storage.codes import Code
from redflow.storage.handoffs import ChildRecord, Outbox
from redflow.storage.keys import partition_of
from redflow.storage.store import Store

from ..conftest import WorkerFactory, wait_until
from ..partitioned import outboxes_empty
from .conftest import PARTED

pytestmark = pytest.mark.timeout(90)

P = PARTED






def _limited_echo(registry: WorkflowRegistry, name: str, running: list[int] | None = None) -> Any:
    async def echo(ctx: WorkflowHandlerContext) -> Any:
        if running is not None:
            running.append(1)
            assert len(running) == 1, "max_concurrency=1 exceeded"
            await asyncio.sleep(0.01)
            running.pop()
        return ctx.input

    return define_workflow(name, handler=echo, registry=registry, max_concurrency=1)


async def test_a_limited_child_lives_in_p0_and_resumes_its_parent_in_any_partition(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory
) -> None:
    running: list[int] = []
    kid = _limited_echo(registry, "pc-kid", running)

    async def parent(ctx: WorkflowHandlerContext) -> Any:
        return await ctx.step.run_workflow("kid", kid, ctx.input * 10)

    wf = define_workflow("pc-parent", handler=parent, registry=registry, max_attempts=1)
    await make_worker(concurrency=8)
    handles = [await parted.enqueue_definition(wf, n) for n in range(2 * P)]
    assert {partition_of(h.id) for h in handles} == {f"p{i}" for i in range(P)}
    assert await asyncio.gather(*(h.result(timeout_ms=30_000) for h in handles)) == [n * 10 for n in range(2 * P)]
    for h in handles:  # the child is indexed under its parent, in the parent's partition, and lives in p0
        kids = (await parted.search_runs(SearchRunsParams(parent_run_id=h.id)))["runs"]
        assert len(kids) == 1 and partition_of(kids[0]["id"]) == "p0"
        child = await parted.get_run(kids[0]["id"])
        assert child is not None and child["status"] == "succeeded" and child["parent_run_id"] == h.id
    await wait_until(lambda: outboxes_empty(parted), what="every hand-off applied and removed")


async def test_the_end_of_a_child_that_ended_before_its_parent_waits_is_found_by_the_wait(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    kid = _limited_echo(registry, "pc-early-kid")

    async def parent(ctx: WorkflowHandlerContext) -> Any:
        return await ctx.step.run_workflow("kid", kid, "early")

    wf = define_workflow("pc-early-parent", handler=parent, registry=registry, max_attempts=1)
    real_suspend = Store.suspend

    async def late_suspend(self: Store, run_id: str, *args: Any, **kwargs: Any) -> Any:
        child_id = kwargs.get("child_id") or ""
        if child_id:  # the child ends, and its end is applied to this partition, before the wait starts
            await wait_until(lambda: _ended(parted, child_id), timeout_s=20, what="the child ended")
            await wait_until(lambda: outboxes_empty(parted), timeout_s=20, what="its end applied")
        return await real_suspend(self, run_id, *args, **kwargs)

    monkeypatch.setattr(Store, "suspend", late_suspend)
    await make_worker(concurrency=2 * P)  # the parents hold their slots while their children run
    handles = [await parted.enqueue_definition(wf, None) for _ in range(P)]
    assert await asyncio.gather(*(h.result(timeout_ms=30_000) for h in handles)) == ["early"] * P


async def _ended(client: RedflowClient, run_id: str) -> bool:
    run = await client.get_run(run_id)
    return run is not None and run["status"] == "succeeded"


async def test_a_childs_end_its_worker_never_applied_is_applied_by_the_leader(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    kid = _limited_echo(registry, "pc-orphan-kid")

    async def parent(ctx: WorkflowHandlerContext) -> Any:
        return await ctx.step.run_workflow("kid", kid, 5)

    wf = define_workflow("pc-orphan-parent", handler=parent, registry=registry, max_attempts=1)
    applied: list[str] = []

    async def never(self: Outbox, child_id: str, retention_ms: int) -> None:
        applied.append(child_id)  # the worker that finished the child "died" before applying its end

    monkeypatch.setattr(Outbox, "apply_child_end", never)
    await make_worker(concurrency=4)
    handles = [await parted.enqueue_definition(wf, None) for _ in range(P)]
    assert await asyncio.gather(*(h.result(timeout_ms=30_000) for h in handles)) == [5] * P
    remote = [h for h in handles if partition_of(h.id) != "p0"]
    assert len(applied) >= len(remote)  # each remote parent's child skipped the eager apply ...
    await wait_until(lambda: outboxes_empty(parted), what="the leader applied every end")  # ... and was applied


async def _parent_in(client: RedflowClient, registry: WorkflowRegistry, index: int, name: str) -> str:
    """A queued run in partition ``index`` (no worker runs it): a parent for hand-off tests."""
    async def idle(ctx: WorkflowHandlerContext) -> None:
        return None

    wf = define_workflow(name, handler=idle, registry=registry)
    while True:
        handle = await client.enqueue_definition(wf, None)
        if partition_of(handle.id) == f"p{index}":
            return handle.id


async def _record_child(client: RedflowClient, parent_id: str, child_id: str) -> bytes:
    """What start_child_elsewhere writes, without applying it (its applier died at once)."""
    home = client.store.of(parent_id)
    member = f"n0:{child_id}"
    record = ChildRecord("pc-held-kid", "default", b"7", 1, 0, parent_id, "")
    reply = await home.scripts.run("start_child_elsewhere", (child_id, parent_id, 0, member, _pack(record), ""),
                                   idempotency=home.keys.idempotency("pc-held-kid", ""))
    assert reply[0] == Code.CREATED
    return member.encode()


def _pack(record: ChildRecord) -> bytes:
    import msgspec

    return msgspec.msgpack.encode(record)


async def test_a_parent_canceled_before_its_child_is_created_gets_no_live_child(
    parted: RedflowClient, registry: WorkflowRegistry
) -> None:
    _limited_echo(registry, "pc-held-kid")
    parent_id = await _parent_in(parted, registry, 2, "pc-cancel-first")
    child_id = "01M8TV0000000000000000CHLD-p0"
    member = await _record_child(parted, parent_id, child_id)
    assert await parted.cancel_run(parent_id)  # the cascade finds the indexed child, not yet created
    assert await Outbox(parted.store.of(parent_id)).apply(parted.retention_ms, members=[member]) == 1
    assert await parted.get_run(child_id) is None  # never created for a canceled parent
    assert await outboxes_empty(parted)
    # A child started after the cancel is refused in the parent's partition, atomically.
    home = parted.store.of(parent_id)
    reply = await home.scripts.run("start_child_elsewhere", ("x-p0", parent_id, 0, "n0:x-p0", b"", ""),
                                   idempotency=home.keys.idempotency("pc-held-kid", ""))
    assert reply[0] == Code.CANCELED


async def test_a_cancel_between_creating_the_child_and_the_recheck_cancels_the_child(
    parted: RedflowClient, registry: WorkflowRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    _limited_echo(registry, "pc-held-kid")
    parent_id = await _parent_in(parted, registry, 1, "pc-cancel-between")
    child_id = "01M8TV0000000000000001CHLD-p0"
    member = await _record_child(parted, parent_id, child_id)
    real_enqueue = Store.enqueue

    async def cancel_then_enqueue(self: Store, run_id: str, *args: Any, **kwargs: Any) -> Any:
        if run_id == child_id:  # after the applier's first check: a whole cancel, cascade included, that
            code, _ = await parted.store.cancel(parent_id, "between", parted.retention_ms)  # finds no child yet
            assert code is Code.OK
            await parted.cancel_descendants(parent_id)
            assert await parted.get_run(child_id) is None
        return await real_enqueue(self, run_id, *args, **kwargs)

    monkeypatch.setattr(Store, "enqueue", cancel_then_enqueue)
    await Outbox(parted.store.of(parent_id)).apply(parted.retention_ms, members=[member])
    child = await parted.get_run(child_id)
    assert child is not None and child["status"] == "canceled"


async def test_canceling_a_parent_cancels_its_child_in_p0_and_retention_leaves_nothing(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory
) -> None:
    gate = asyncio.Event()

    async def blocked(ctx: WorkflowHandlerContext) -> Any:
        await gate.wait()

    kid = define_workflow("pc-blocked-kid", handler=blocked, registry=registry, max_concurrency=10)

    async def parent(ctx: WorkflowHandlerContext) -> Any:
        return await ctx.step.run_workflow("kid", kid, None)

    wf = define_workflow("pc-cancel-parent", handler=parent, registry=registry, max_attempts=1)
    await make_worker(concurrency=8)
    handles = [await parted.enqueue_definition(wf, None) for _ in range(P)]

    async def kids_running() -> list[str] | None:
        ids = []
        for h in handles:
            kids = (await parted.search_runs(SearchRunsParams(parent_run_id=h.id)))["runs"]
            if not kids or kids[0]["status"] != "running":
                return None
            ids.append(kids[0]["id"])
        return ids

    kid_ids = await wait_until(kids_running, what="every child running in p0")
    for h in handles:
        assert await parted.cancel_run(h.id)
    for h in handles:
        with pytest.raises(CanceledError):
            await h.result(timeout_ms=20_000)
    for kid_id in kid_ids:
        await wait_until(lambda k=kid_id: _status(parted, k, "canceled"), what="the child canceled")
    await wait_until(lambda: outboxes_empty(parted), what="every hand-off applied")
    assert await parted.cleanup_expired_runs_now(reference_time_ms=10**13) >= 2 * P
    for s in parted.store.partitions:  # nothing of the crossings is left
        assert await parted.redis.execute("HLEN", s.keys.child_ends) == 0
        assert await parted.redis.execute("ZCARD", s.keys.children) == 0
        assert await parted.redis.execute("HLEN", s.keys.outbox_data) == 0


async def _status(client: RedflowClient, run_id: str, status: str) -> bool:
    run = await client.get_run(run_id)
    return run is not None and run["status"] == status


async def test_a_remote_child_refused_at_admission_resumes_its_parent_without_the_leader(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rate-limited child fails at admission; the worker that refused it hands its end over at once
    (the leaders' hand-off duty is switched off here, so only that can resume the parents)."""
    from redflow import WorkflowRateLimitOptions
    from redflow.errors import RedflowError
    from redflow.leader.duties import LeaderDuties

    async def no_duty(self: LeaderDuties) -> None:
        return None

    monkeypatch.setattr(LeaderDuties, "apply_handoffs", no_duty)

    async def noop(ctx: WorkflowHandlerContext) -> Any:
        return None

    kid = define_workflow("pc-rated-kid", handler=noop, registry=registry,
                          rate_limit=WorkflowRateLimitOptions(key=lambda i: "all", limit=1, period="1h"))

    async def parent(ctx: WorkflowHandlerContext) -> str:
        try:
            await ctx.step.run_workflow("kid", kid, ctx.input)
        except RedflowError as exc:
            return f"child failed: {type(exc).__name__}"
        return "child ran"

    wf = define_workflow("pc-rated-parent", handler=parent, registry=registry, max_attempts=1)
    await make_worker(concurrency=8)
    outcomes = []
    while len(outcomes) < 3:  # parents outside p0 only: each child crosses
        handle = await parted.enqueue_definition(wf, len(outcomes))
        if partition_of(handle.id) == "p0":
            await handle.result(timeout_ms=20_000)
            continue
        outcomes.append(await handle.result(timeout_ms=20_000))
    assert outcomes[1:] == ["child failed: RedflowError"] * 2
