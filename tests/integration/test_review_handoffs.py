"""Adversarial review of the cross-partition child hand-offs (start_child_elsewhere, child_ended,
handoff_done). A limited workflow's runs live in p0; a parent in another partition starts such a
child through its own partition's outbox, and the child's end comes back through p0's outbox.

Each test compares with what the same program does when parent and child share a partition
(one ``runs`` hash, enqueue.lua's idempotency rule, end_run's direct resume)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from redflow import (
    RedflowClient,
    WorkflowHandlerContext,
    WorkflowRateLimitOptions,
    WorkflowRegistry,
    define_workflow,
)
from redflow.leader.duties import LeaderDuties
from redflow.storage.codes import Code
from redflow.storage.handoffs import ChildRecord, Outbox
from redflow.storage.keys import partition_of

from ..conftest import WorkerFactory, wait_until
from ..partitioned import outboxes_empty
from .conftest import PARTED

pytestmark = pytest.mark.timeout(90)

P = PARTED






async def _enqueue_in(client: RedflowClient, wf: Any, index: int, data: Any = None) -> str:
    """Enqueue runs of ``wf`` until one lands in partition ``index``; the others are canceled."""
    while True:
        handle = await client.enqueue_definition(wf, data)
        if partition_of(handle.id) == f"p{index}":
            return handle.id
        await client.cancel_run(handle.id)


def _pack(record: ChildRecord) -> bytes:
    import msgspec

    return msgspec.msgpack.encode(record)


# --- idempotency keys of remote children ----------------------------------------------------------


async def test_a_key_bound_to_a_child_never_created_is_rebound(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory
) -> None:
    """Parent A (p2) starts a limited child with key K; A is canceled before its applier creates the
    child, so the child never exists. Parent B (p2) then starts the same workflow with key K.
    In one partition A's child would exist (canceled) and enqueue.lua would rebind K for B. Here
    start_child_elsewhere.lua keeps the binding (no child_ends entry: neither failed nor canceled)
    and answers EXISTING with the id of a run that does not exist: B waits for it forever."""
    async def kid(ctx: WorkflowHandlerContext) -> Any:
        return "kid ran"

    define_workflow("rh-ghost-kid", handler=kid, registry=registry, max_concurrency=5)

    async def parent_b(ctx: WorkflowHandlerContext) -> Any:
        return await ctx.step.run_workflow("kid", "rh-ghost-kid", None, idempotency_key="K")

    wf_b = define_workflow("rh-ghost-b", handler=parent_b, registry=registry, max_attempts=1)

    async def idle(ctx: WorkflowHandlerContext) -> None:
        return None

    wf_a = define_workflow("rh-ghost-a", handler=idle, registry=registry)
    b_id = await _enqueue_in(parted, wf_b, 2)
    a_id = await _enqueue_in(parted, wf_a, 2)
    home = parted.store.of(a_id)
    ghost = "01M8TV00000000000000GHOST0-p0"
    # What start_child_elsewhere writes for A with key K; A's applier dies before creating it.
    record = ChildRecord("rh-ghost-kid", "default", b"null", 1, 0, a_id, "")
    reply = await home.scripts.run("start_child_elsewhere", (ghost, a_id, 3600, f"n0:{ghost}", _pack(record), ""),
                                   idempotency=home.keys.idempotency("rh-ghost-kid", "K"))
    assert reply[0] == Code.CREATED
    assert await parted.cancel_run(a_id)  # before the child exists
    await Outbox(home).apply(parted.retention_ms)  # the leader: the child is never created
    assert await parted.get_run(ghost) is None
    await make_worker(concurrency=4)
    bound = await wait_until(lambda: _child_of(parted, b_id), timeout_s=10, what="B started its child")
    assert bound != ghost, f"B's key K is bound to {ghost}, a run that does not exist"
    assert await parted.make_run_handle(b_id).result(timeout_ms=10_000) == "kid ran"


async def _child_of(client: RedflowClient, run_id: str) -> str | None:
    for s in await client.get_run_steps(run_id):
        if s.get("child_run_id"):
            return s["child_run_id"]
    return None


@pytest.mark.parametrize("where", [
    0,  # control: parent and child in p0, enqueue.lua rebinds a key whose run is gone
    3,
])
async def test_a_key_bound_to_a_child_deleted_by_retention_is_rebound(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory, where: int
) -> None:
    """Retention shorter than the idempotency TTL (7 days by default; retention is configurable):
    parent A and its remote child end and are deleted, the key K in A's partition still names the
    deleted child. In one partition enqueue.lua finds the bound run gone and rebinds; here
    cleanup.lua deleted A's child_ends entry, so start_child_elsewhere.lua keeps the binding and
    parent B (same partition, same key) waits for a deleted run forever."""
    async def kid(ctx: WorkflowHandlerContext) -> Any:
        return ctx.input

    define_workflow("rh-ret-kid", handler=kid, registry=registry, max_concurrency=5)

    async def parent(ctx: WorkflowHandlerContext) -> Any:
        return await ctx.step.run_workflow("kid", "rh-ret-kid", ctx.input, idempotency_key="K")

    wf = define_workflow("rh-ret-parent", handler=parent, registry=registry, max_attempts=1)
    a_id = await _enqueue_in(parted, wf, where, "first")
    worker = await make_worker(concurrency=4)
    assert await parted.make_run_handle(a_id).result(timeout_ms=15_000) == "first"
    await wait_until(lambda: outboxes_empty(parted), what="every hand-off applied")
    await worker.stop(grace_period_ms=0)
    assert await parted.cleanup_expired_runs_now(reference_time_ms=10**13) >= 2  # A, its child (and the rest)
    b_id = await _enqueue_in(parted, wf, where, "second")
    await make_worker(concurrency=4)
    bound = await wait_until(lambda: _child_of(parted, b_id), timeout_s=10, what="B started its child")
    # In one partition: a new child, "second". Here: EXISTING, the deleted child; B never resumes.
    assert await parted.get_run(bound) is not None, f"B waits for {bound}, deleted by retention"
    assert await parted.make_run_handle(b_id).result(timeout_ms=10_000) == "second"


@pytest.mark.parametrize("where", [
    0,  # control: one partition, end_run resumes every waiter of the child
    1,
])
async def test_a_parent_joining_a_live_child_by_key_resumes_after_the_first_parent_is_deleted(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory, where: int
) -> None:
    """Parent A (p1) emits a limited child with key K and ends; retention deletes A while the child
    still runs. Parent B (p1) runs the same workflow with key K: bound to the live child, it waits.
    In one partition the child's end_run resumes every waiter of ``c:<child>:``. Here the end goes
    through child_ended.lua with the child's parent_id (A): A is gone, so it returns NOT_FOUND before
    looking at the waiters, and B never resumes."""
    gate = asyncio.Event()

    async def kid(ctx: WorkflowHandlerContext) -> Any:
        await gate.wait()
        return "done"

    define_workflow("rh-join-kid", handler=kid, registry=registry, max_concurrency=5)

    async def parent_a(ctx: WorkflowHandlerContext) -> Any:
        return await ctx.step.emit_workflow("kid", "rh-join-kid", None, idempotency_key="K")

    async def parent_b(ctx: WorkflowHandlerContext) -> Any:
        return await ctx.step.run_workflow("kid", "rh-join-kid", None, idempotency_key="K")

    wf_a = define_workflow("rh-join-a", handler=parent_a, registry=registry, max_attempts=1)
    wf_b = define_workflow("rh-join-b", handler=parent_b, registry=registry, max_attempts=1)
    a_id = await _enqueue_in(parted, wf_a, where)
    await make_worker(concurrency=6)
    child_id = await parted.make_run_handle(a_id).result(timeout_ms=15_000)
    assert partition_of(child_id) == "p0"
    await wait_until(lambda: _status(parted, child_id, "running"), what="the child runs")
    await parted.cleanup_expired_runs_now(reference_time_ms=10**13)  # A is deleted; the live child stays
    assert await parted.get_run(a_id) is None and await parted.get_run(child_id) is not None
    b_id = await _enqueue_in(parted, wf_b, where)
    await wait_until(lambda: _status(parted, b_id, "scheduled"), what="B waits for the child")
    assert await _child_of(parted, b_id) == child_id  # B joined A's child by the key
    gate.set()
    await wait_until(lambda: _status(parted, child_id, "succeeded"), what="the child ended")
    assert await parted.make_run_handle(b_id).result(timeout_ms=10_000) == "done"


async def _status(client: RedflowClient, run_id: str, status: str) -> bool:
    run = await client.get_run(run_id)
    return run is not None and run["status"] == status


# --- ends that no worker applies at once ------------------------------------------------------------


async def test_a_child_refused_at_admission_resumes_its_parent_without_the_leader(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A remote child whose admission fails it (here its rate_limit key function raises) ends on the
    worker that claimed it, like a child whose handler fails; but executor.execute returns right
    after ``_admit`` returned False (executor.py: ``elif claimed.kind == "admit" and not await
    _admit(...): return``), before the apply_child_end at its end. Only p0's leader applies the end:
    the parent waits a leader tick, or forever while p0 has no leader applying hand-offs (here the
    leaders' hand-off duty is off, to show who applies it). A handler failure (control) is applied
    at once by the worker."""
    async def no_handoffs(self: LeaderDuties) -> None:
        return None

    monkeypatch.setattr(LeaderDuties, "apply_handoffs", no_handoffs)

    def bad_key(value: Any) -> str:
        raise ValueError("no key")

    async def kid(ctx: WorkflowHandlerContext) -> Any:
        if ctx.input == "fail":
            raise ValueError("handler failed")
        return ctx.input

    define_workflow("rh-adm-kid", handler=kid, registry=registry, max_attempts=1,
                    rate_limit=WorkflowRateLimitOptions(limit=5, period="1s", key=bad_key))
    define_workflow("rh-ctl-kid", handler=kid, registry=registry, max_attempts=1, max_concurrency=5)

    async def parent(ctx: WorkflowHandlerContext) -> Any:
        try:
            return await ctx.step.run_workflow("kid", ctx.input, "fail")
        except Exception as exc:
            return f"learned: {type(exc).__name__}"

    wf = define_workflow("rh-adm-parent", handler=parent, registry=registry, max_attempts=1)
    control = await _enqueue_in(parted, wf, 1, "rh-ctl-kid")
    refused = await _enqueue_in(parted, wf, 1, "rh-adm-kid")
    await make_worker(concurrency=6)
    assert (await parted.make_run_handle(control).result(timeout_ms=10_000)).startswith("learned")
    assert (await parted.make_run_handle(refused).result(timeout_ms=10_000)).startswith("learned")


# --- attacks that held (kept as regression tests) -------------------------------------------------


async def test_the_same_key_twice_from_one_parent_and_rebinding_after_a_failed_child(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory
) -> None:
    attempts: list[str] = []

    async def kid(ctx: WorkflowHandlerContext) -> Any:
        attempts.append(ctx.run.id)
        if ctx.input == "fail":
            raise ValueError("nope")
        return ctx.input

    define_workflow("rh-key-kid", handler=kid, registry=registry, max_attempts=1, max_concurrency=5)

    async def parent(ctx: WorkflowHandlerContext) -> Any:
        a = await ctx.step.run_workflow("a", "rh-key-kid", "x", idempotency_key="same")
        b = await ctx.step.run_workflow("b", "rh-key-kid", "y", idempotency_key="same")  # the same child
        try:
            await ctx.step.run_workflow("c", "rh-key-kid", "fail", idempotency_key="other")
        except Exception:
            pass
        d = await ctx.step.run_workflow("d", "rh-key-kid", "z", idempotency_key="other")  # rebound
        return [a, b, d]

    wf = define_workflow("rh-key-parent", handler=parent, registry=registry, max_attempts=1)
    pid = await _enqueue_in(parted, wf, 2)
    await make_worker(concurrency=4)
    assert await parted.make_run_handle(pid).result(timeout_ms=20_000) == ["x", "x", "z"]
    assert len(attempts) == 3


async def test_two_appliers_of_one_creation_and_one_end_create_once_and_resume_once(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every outbox entry applied by two appliers at once (the eager one and a concurrent one)."""
    ran: list[str] = []

    async def kid(ctx: WorkflowHandlerContext) -> Any:
        ran.append(ctx.run.id)
        return ctx.input

    define_workflow("rh-dup-kid", handler=kid, registry=registry, max_attempts=1, max_concurrency=5)

    async def parent(ctx: WorkflowHandlerContext) -> Any:
        return [await ctx.step.run_workflow(str(i), "rh-dup-kid", i) for i in range(3)]

    wf = define_workflow("rh-dup-parent", handler=parent, registry=registry, max_attempts=1)
    real = Outbox._apply

    async def twice(self: Outbox, member: bytes, retention_ms: int) -> list[str]:
        a, b = await asyncio.gather(real(self, member, retention_ms), real(self, member, retention_ms))
        return a + b

    monkeypatch.setattr(Outbox, "_apply", twice)
    ids = [await _enqueue_in(parted, wf, i) for i in (1, 2, 3)]
    await make_worker(concurrency=6)
    for pid in ids:
        assert await parted.make_run_handle(pid).result(timeout_ms=20_000) == [0, 1, 2]
    assert len(ran) == len(set(ran)) == 9
    await wait_until(lambda: outboxes_empty(parted), what="outboxes empty")


async def test_a_timed_out_wait_cancels_the_remote_child_and_its_late_end_resumes_nothing(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory
) -> None:
    gate = asyncio.Event()

    async def slow(ctx: WorkflowHandlerContext) -> Any:
        if ctx.input == "slow":
            await gate.wait()
        return ctx.input

    define_workflow("rh-to-kid", handler=slow, registry=registry, max_attempts=1, max_concurrency=5)

    async def parent(ctx: WorkflowHandlerContext) -> Any:
        try:
            await ctx.step.run_workflow("slow", "rh-to-kid", "slow", timeout_ms=300)
        except Exception as exc:
            assert "did not finish in time" in str(exc)
        return await ctx.step.run_workflow("fast", "rh-to-kid", "fast")

    wf = define_workflow("rh-to-parent", handler=parent, registry=registry, max_attempts=1)
    pid = await _enqueue_in(parted, wf, 2)
    await make_worker(concurrency=4)
    assert await parted.make_run_handle(pid).result(timeout_ms=20_000) == "fast"
    gate.set()
    await wait_until(lambda: outboxes_empty(parted), what="outboxes empty")


# --- cancel, then retry, before the child is created ----------------------------------------------


async def test_a_child_of_a_canceled_attempt_is_not_created_after_the_parent_is_retried(
    parted: RedflowClient, registry: WorkflowRegistry
) -> None:
    async def idle(ctx: WorkflowHandlerContext) -> None:
        return None

    define_workflow("rh-cr-kid", handler=idle, registry=registry, max_concurrency=5)
    wf = define_workflow("rh-cr-parent", handler=idle, registry=registry)
    parent_id = await _enqueue_in(parted, wf, 2)
    home = parted.store.of(parent_id)
    child_id = "01M8TV0000000000000000CRTY-p0"
    record = ChildRecord("rh-cr-kid", "default", b"null", 1, 0, parent_id, "")
    reply = await home.scripts.run("start_child_elsewhere",
                                   (child_id, parent_id, 0, f"n0:{child_id}", _pack(record), ""),
                                   idempotency=home.keys.idempotency("rh-cr-kid", ""))
    assert reply[0] == Code.CREATED  # its applier died here
    assert await parted.cancel_run(parent_id)
    await parted.retry_run(parent_id)  # the operator retries the canceled parent
    await Outbox(home).apply(parted.retention_ms)  # the leader applies the entry of the canceled attempt
    child = await parted.get_run(child_id)
    assert child is None or child["status"] == "canceled", f"the canceled attempt's child is {child['status']}"


async def test_parents_canceled_while_their_children_cross_leave_no_live_child(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each parent is canceled at a forced point of its child's creation: before the applier reads
    the record, between the first check and the enqueue, between the enqueue and the recheck, and
    after the recheck (before handoff_done)."""
    async def kid(ctx: WorkflowHandlerContext) -> Any:
        await asyncio.sleep(5)

    define_workflow("rh-cx-kid", handler=kid, registry=registry, max_concurrency=50)

    async def parent(ctx: WorkflowHandlerContext) -> Any:
        return await ctx.step.run_workflow("kid", "rh-cx-kid", None)

    wf = define_workflow("rh-cx-parent", handler=parent, registry=registry, max_attempts=1)
    points = ["read", "enqueue", "recheck", "done"]
    import msgspec

    from redflow.storage.store import Store

    real_apply, real_enqueue = Outbox._apply, Store.enqueue
    victims: dict[str, str] = {}  # parent id -> point
    state: dict[str, int] = {}

    canceled: set[str] = set()

    async def cancel(pid: str) -> None:
        if pid not in canceled:
            canceled.add(pid)
            assert await parted.cancel_run(pid)

    async def apply(self: Outbox, member: bytes, retention_ms: int) -> list[str]:
        if member.startswith(b"n"):
            raw = await self.redis.execute("HGET", self.keys.outbox_data, member)
            pid = "" if raw is None else msgspec.msgpack.decode(raw, type=ChildRecord).parent_run_id
            if victims.get(pid) == "read":
                await cancel(pid)
        return await real_apply(self, member, retention_ms)

    async def enqueue(self: Store, run_id: str, *args: Any, **kwargs: Any) -> Any:
        parent_id = args[7] if len(args) > 7 else kwargs.get("parent_run_id")
        if parent_id and victims.get(parent_id) == "enqueue":
            await cancel(parent_id)
        out = await real_enqueue(self, run_id, *args, **kwargs)
        if parent_id and victims.get(parent_id) == "recheck":
            await cancel(parent_id)
        return out

    monkeypatch.setattr(Outbox, "_apply", apply)
    monkeypatch.setattr(Store, "enqueue", enqueue)
    ids = []
    for i in range(8):
        pid = await _enqueue_in(parted, wf, 1 + i % 3)
        victims[pid] = points[i % 4]
        ids.append(pid)
    await make_worker(concurrency=20)

    async def done_point() -> bool:
        for pid, point in victims.items():
            if point == "done" and state.get(pid) is None:
                kids = await parted.store.children_of(pid)
                if kids and await parted.get_run(kids[0]) is not None:
                    await cancel(pid)
                    state[pid] = 1
        return all(state.get(p) for p, pt in victims.items() if pt == "done")

    await wait_until(done_point, timeout_s=20, what="the 'done' parents canceled once their child exists")
    for pid in ids:
        await wait_until(lambda p=pid: _status(parted, p, "canceled"), timeout_s=20, what="parent canceled")
    await wait_until(lambda: outboxes_empty(parted), timeout_s=20, what="outboxes empty")
    for pid in ids:
        for kid_id in await parted.store.children_of(pid):
            run = await parted.get_run(kid_id)
            assert run is None or run["status"] == "canceled", (victims[pid], kid_id, run and run["status"])
            if victims[pid] in ("recheck", "done"):  # created, then canceled
                assert run is not None, (victims[pid], kid_id)
