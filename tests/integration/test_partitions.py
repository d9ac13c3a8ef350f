"""A prefix with several partitions: the count is fixed when the prefix is created, runs are placed
at enqueue (spread, by key, limited workflows in p0, children with their parent), one worker
claims from every partition within one concurrency, each partition has its own leader, and
queries merge the partitions in id order with cursors valid in all of them."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from redflow import (
    EventTrigger,
    ListEventsParams,
    ListRunsParams,
    RedflowClient,
    SearchRunsParams,
    WorkflowHandlerContext,
    WorkflowRegistry,
    create_client,
    define_workflow,
)
from redflow.errors import ConfigurationError
from redflow.storage.codes import Code
from redflow.storage.handoffs import Outbox
from redflow.storage.keys import PartitionKeys, partition_of

from ..conftest import WorkerFactory, wait_until
from .conftest import PARTED

pytestmark = pytest.mark.timeout(90)

P = PARTED


@pytest.fixture(autouse=True)
def _counts_pinned_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests pin their prefixes' partition counts (or leave them unset on purpose), so the
    suite's REDFLOW_PARTITIONS must not override them."""
    monkeypatch.delenv("REDFLOW_PARTITIONS", raising=False)




def _echo(registry: WorkflowRegistry, name: str = "part-echo", **options: Any) -> Any:
    async def echo(ctx: WorkflowHandlerContext) -> Any:
        return await ctx.step.run("echo", lambda: ctx.input)

    return define_workflow(name, handler=echo, registry=registry, **options)


async def _partition_sizes(client: RedflowClient) -> list[int]:
    return [int(await client.redis.execute("HLEN", s.keys.runs)) for s in client.store.partitions]


async def test_the_count_is_recorded_once_and_a_different_one_is_refused(
    parted: RedflowClient, redis_url: str, prefix: str
) -> None:
    assert parted.partition_count == P
    assert await parted.redis.execute("GET", parted.keys.partitions) == b"4"
    for i in range(P):  # every partition carries the layout version
        assert await parted.redis.execute("GET", PartitionKeys(prefix, f"p{i}").version) is not None

    adopting = create_client(url=redis_url, prefix=prefix)
    try:
        await adopting.store.ensure_ready()
        assert adopting.partition_count == P
    finally:
        await adopting.close()

    other = create_client(url=redis_url, prefix=prefix, partitions=2)
    try:
        with pytest.raises(ConfigurationError, match=r"has 4 partition\(s\), fixed when it was created"):
            await other.store.ensure_ready()
    finally:
        await other.close()


async def test_a_prefix_without_a_recorded_count_has_one_partition(redis_url: str, prefix: str) -> None:
    # A prefix created before counts were recorded: one partition's layout version, and no count
    # (made with one partition explicitly: a cluster's default would record 16).
    first = create_client(url=redis_url, prefix=prefix, partitions=1)
    try:
        await first.store.ensure_ready()
        await first.redis.execute("DEL", first.keys.partitions)
    finally:
        await first.close()
    for requested, ok in ((None, True), (1, True), (4, False)):
        c = create_client(url=redis_url, prefix=prefix, partitions=requested)
        try:
            if ok:
                await c.store.ensure_ready()
                assert c.partition_count == 1
            else:
                with pytest.raises(ConfigurationError, match=r"has 1 partition\(s\)"):
                    await c.store.ensure_ready()
        finally:
            await c.close()


@pytest.mark.parametrize("bad", [0, -1, 257, "four", 2.5, True])
async def test_bad_partition_counts_are_refused_before_anything_is_written(
    redis_url: str, prefix: str, bad: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigurationError, match="partitions must be"):
        create_client(url=redis_url, prefix=prefix, partitions=bad)
    monkeypatch.setenv("REDFLOW_PARTITIONS", str(bad))
    with pytest.raises(ConfigurationError, match="REDFLOW_PARTITIONS must be"):
        create_client(url=redis_url, prefix=prefix)


async def test_runs_spread_over_every_partition_and_one_worker_runs_them_all(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory
) -> None:
    wf = _echo(registry)
    handles = [await parted.enqueue_definition(wf, {"n": n}) for n in range(40)]
    assert Counter(partition_of(h.id) for h in handles) == {f"p{i}": 10 for i in range(P)}
    batch = await parted.enqueue_many(wf, [{"m": m} for m in range(20)])
    assert Counter(partition_of(h.id) for h in batch) == {f"p{i}": 5 for i in range(P)}
    assert await _partition_sizes(parted) == [15] * P

    worker = await make_worker(concurrency=8)
    assert len(worker.group) == P and {w.store.keys.partition for w in worker.group} == {f"p{i}" for i in range(P)}
    results = await asyncio.gather(*(h.result(timeout_ms=20_000) for h in handles + batch))
    assert results == [{"n": n} for n in range(40)] + [{"m": m} for m in range(20)]
    stats = await parted.get_stats()
    assert stats["by_status"]["succeeded"] == 60 and stats["total"] == 60
    assert stats["backlog"]["default"] == {"ready": 0, "scheduled": 0}


async def test_one_concurrency_is_shared_by_the_partitions(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory
) -> None:
    running = 0
    peak = 0

    async def slow(ctx: WorkflowHandlerContext) -> Any:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        return ctx.input

    wf = define_workflow("part-slow", handler=slow, registry=registry)
    handles = [await parted.enqueue_definition(wf, n) for n in range(24)]
    await make_worker(concurrency=3)
    assert await asyncio.gather(*(h.result(timeout_ms=20_000) for h in handles)) == list(range(24))
    assert peak == 3


async def test_listing_merges_partitions_in_id_order_and_cursors_visit_each_run_once(
    parted: RedflowClient, registry: WorkflowRegistry
) -> None:
    wf = _echo(registry, "part-list")
    ids = [(await parted.enqueue_definition(wf, n)).id for n in range(30)]
    assert len({partition_of(i) for i in ids}) == P
    for sort in ("desc", "asc"):
        seen: list[str] = []
        cursor = None
        while True:
            page = await parted.list_runs(ListRunsParams(workflow="part-list", limit=7, cursor=cursor, sort=sort))
            if not page:
                break
            seen += [r["id"] for r in page]
            cursor = page[-1]["cursor"]
        assert seen == sorted(ids, reverse=sort == "desc")
    found = await parted.search_runs(SearchRunsParams(status="queued", limit=100))
    assert sorted(r["id"] for r in found["runs"]) == sorted(ids) and found["cursor"] is None


async def test_an_idempotency_key_finds_its_run_in_the_partition_it_hashes_to(
    parted: RedflowClient, registry: WorkflowRegistry
) -> None:
    wf = _echo(registry, "part-idem")
    for key in ("alpha", "beta", "gamma", "delta", "epsilon"):
        first = await parted.enqueue_definition(wf, 1, idempotency_key=key)
        again = await parted.run_by_name("part-idem", 2, idempotency_key=key)
        assert again.id == first.id
    assert sum(await _partition_sizes(parted)) == 5


async def test_a_limited_workflow_lives_in_p0_and_keeps_its_limit(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory
) -> None:
    running = 0
    peak = 0

    async def slow(ctx: WorkflowHandlerContext) -> Any:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        return ctx.input

    wf = define_workflow("part-limited", handler=slow, registry=registry, max_concurrency=2)
    await make_worker(concurrency=8)
    handles = [await parted.enqueue_definition(wf, n) for n in range(8)]
    handles += [await parted.run_by_name("part-limited", n) for n in range(8, 12)]
    assert {partition_of(h.id) for h in handles} == {"p0"}
    assert await asyncio.gather(*(h.result(timeout_ms=20_000) for h in handles)) == list(range(12))
    assert peak == 2


async def test_children_live_with_their_parent_and_sleeps_wake_in_every_partition(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory
) -> None:
    async def child(ctx: WorkflowHandlerContext) -> Any:
        await ctx.step.wait_for("nap", "30ms")
        return ctx.input * 2

    kid = define_workflow("part-kid", handler=child, registry=registry)

    async def parent(ctx: WorkflowHandlerContext) -> Any:
        await ctx.step.wait_for("rest", "30ms")
        return await ctx.step.run_workflow("kid", kid, ctx.input)

    wf = define_workflow("part-parent", handler=parent, registry=registry)
    await make_worker(concurrency=4)
    handles = [await parted.enqueue_definition(wf, n) for n in range(8)]
    assert await asyncio.gather(*(h.result(timeout_ms=20_000) for h in handles)) == [2 * n for n in range(8)]
    for h in handles:
        kids = await parted.search_runs(SearchRunsParams(parent_run_id=h.id))
        assert [partition_of(r["id"]) for r in kids["runs"]] == [partition_of(h.id)]


async def test_cancel_reaches_a_run_in_any_partition(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory
) -> None:
    gate = asyncio.Event()
    started: set[str] = set()

    async def blocked(ctx: WorkflowHandlerContext) -> Any:
        started.add(ctx.run.id)
        await gate.wait()

    wf = define_workflow("part-cancel", handler=blocked, registry=registry)
    await make_worker(concurrency=P)
    handles = [await parted.enqueue_definition(wf, n) for n in range(P)]
    await wait_until(lambda: len(started) == P, what="a run running in every partition")
    assert (await parted.get_stats())["by_status"]["running"] == P
    for h in handles:
        assert await parted.cancel_run(h.id)
    for h in handles:
        with pytest.raises(Exception, match="cancel"):
            await h.result(timeout_ms=10_000)
    assert (await parted.get_stats())["by_status"]["canceled"] == P


def _waiter(registry: WorkflowRegistry, name: str, event: str) -> Any:
    async def waiter(ctx: WorkflowHandlerContext) -> Any:
        got = await ctx.step.wait_for_event("wait", event, ctx.input, timeout=20_000)
        return None if got is None else got["data"]

    return define_workflow(name, handler=waiter, registry=registry, max_attempts=1)


async def _waiting(client: RedflowClient, ids: list[str]) -> bool:
    headers = await client.store.read_headers(ids)
    return all(h is not None and h.status == "scheduled" for h in headers)


async def test_an_event_resumes_runs_waiting_in_every_partition(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory
) -> None:
    wf = _waiter(registry, "part-waiter", "part.paid")
    await make_worker(concurrency=8)
    handles = [await parted.enqueue_definition(wf, f"k{n}") for n in range(8)]
    assert len({partition_of(h.id) for h in handles}) == P
    await wait_until(lambda: _waiting(parted, [h.id for h in handles]), what="every run waiting")
    for n in range(8):
        emitted = await parted.emit_event_detailed("part.paid", {"n": n}, correlation_key=f"k{n}")
        assert emitted["resumed_run_ids"] == [handles[n].id]
        record = await parted.get_event(emitted["event_id"])  # the record lists runs resumed in any partition
        assert record is not None and record["resumed_run_ids"] == [handles[n].id]
        assert record["resumed_run_count"] == 1
    assert await asyncio.gather(*(h.result(timeout_ms=20_000) for h in handles)) == [{"n": n} for n in range(8)]
    for s in parted.store.partitions:  # every hand-off applied and removed
        assert await parted.redis.execute("ZCARD", s.keys.outbox) == 0


async def test_an_event_emitted_before_the_wait_is_found_in_every_partition(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory
) -> None:
    wf = _waiter(registry, "part-early", "part.early")
    handles = [await parted.enqueue_definition(wf, f"e{n}") for n in range(8)]  # created, not started
    for n in range(8):
        await parted.emit_event("part.early", n, correlation_key=f"e{n}")
    await make_worker(concurrency=8)
    assert await asyncio.gather(*(h.result(timeout_ms=20_000) for h in handles)) == list(range(8))


async def test_a_step_event_fans_out_in_its_runs_partition_and_reaches_the_others(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory
) -> None:
    async def sub(ctx: WorkflowHandlerContext) -> Any:
        return ctx.input

    define_workflow("part-sub", handler=sub, registry=registry, event=[EventTrigger(name="part.step")])
    waiter = _waiter(registry, "part-step-waiter", "part.step")

    async def emitter(ctx: WorkflowHandlerContext) -> Any:
        return await ctx.step.emit_event("emit", "part.step", {"from": ctx.run.id}, correlation_key=ctx.input)

    em = define_workflow("part-emitter", handler=emitter, registry=registry)
    await make_worker(concurrency=8)
    waiters = [await parted.enqueue_definition(waiter, f"s{n}") for n in range(P)]
    await wait_until(lambda: _waiting(parted, [h.id for h in waiters]), what="waiters waiting")
    emitters = [await parted.enqueue_definition(em, f"s{n}") for n in range(P)]
    subscriber_ids = await asyncio.gather(*(h.result(timeout_ms=20_000) for h in emitters))
    for h, subs in zip(emitters, subscriber_ids, strict=True):
        assert [partition_of(i) for i in subs] == [partition_of(h.id)]  # a child of the emitting run
        kids = await parted.search_runs(SearchRunsParams(parent_run_id=h.id))
        assert [r["id"] for r in kids["runs"]] == subs
        assert await parted.wait_for_result(subs[0], timeout_ms=20_000) == {"from": h.id}
    results = await asyncio.gather(*(h.result(timeout_ms=20_000) for h in waiters))
    assert sorted(r["from"] for r in results) == sorted(h.id for h in emitters)
    events = await parted.list_events(ListEventsParams(name="part.step", limit=2))
    seen = [e["id"] for e in events]
    while len(events) == 2:
        events = await parted.list_events(ListEventsParams(name="part.step", limit=2, cursor=seen[-1]))
        seen += [e["id"] for e in events]
    assert len(seen) == len(set(seen)) == P
    for event_id in seen:
        record = await parted.get_event(event_id)
        assert record is not None and record["id"] == event_id


async def test_a_hand_off_its_emitter_never_applied_is_applied_by_the_leader_once(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory
) -> None:
    wf = _waiter(registry, "part-orphan", "part.orphan")
    await make_worker(concurrency=8)
    handles = [await parted.enqueue_definition(wf, "same") for _ in range(P)]
    await wait_until(lambda: _waiting(parted, [h.id for h in handles]), what="waiters waiting")
    # An emitter that recorded the event and died before it applied the hand-offs: only the script ran.
    code, event_id, _ = await parted.events.emit(
        "evt-orphan", "part.orphan", b"7", correlation_key="same", parent_run_id=None, emit_at_ms=0,
        idempotency_key=None, idempotency_ttl_s=0, retention_ms=parted.retention_ms,
        run_id_prefix="01M8TGPQ80ZRM8YYGRDENGJFFG"[:24], run_id_suffix="-p0",
    )
    assert code is Code.CREATED
    outbox = parted.store.keys.outbox
    assert sorted(await parted.redis.execute("ZRANGE", outbox, 0, -1)) == [
        f"{i}:{event_id}".encode() for i in range(1, P)]
    assert await asyncio.gather(*(h.result(timeout_ms=20_000) for h in handles)) == [7] * P  # the leader applied
    assert await parted.redis.execute("ZCARD", outbox) == 0
    record = await parted.get_event(event_id)
    assert record is not None and sorted(record["resumed_run_ids"]) == sorted(h.id for h in handles)

    # Applied again (an applier that died before removing the entry): nothing changes.
    before = [await parted.redis.execute("ZCARD", s.keys.event_buffer) for s in parted.store.partitions]
    await parted.redis.execute("ZADD", outbox, 0, f"2:{event_id}")
    assert await Outbox(parted.store).apply(parted.retention_ms) == 1
    assert [await parted.redis.execute("ZCARD", s.keys.event_buffer) for s in parted.store.partitions] == before
    assert await parted.redis.execute("ZCARD", outbox) == 0
    assert (await parted.get_stats())["by_status"]["succeeded"] == P

    # Retention removes the copies with the event, and counts the event once.
    assert await parted.cleanup_expired_events_now(reference_time_ms=10**13) == 1
    for s in parted.store.partitions:
        assert await parted.redis.execute("HLEN", s.keys.event_copies) == 0
        assert await parted.redis.execute("ZCARD", s.keys.event_buffer) == 0
        assert await parted.redis.execute("HLEN", s.keys.event_data) == 0


async def test_each_partition_elects_a_leader_and_retention_covers_every_partition(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory
) -> None:
    wf = _echo(registry, "part-retention")
    handles = [await parted.enqueue_definition(wf, n) for n in range(8)]
    worker = await make_worker(concurrency=4)
    await asyncio.gather(*(h.result(timeout_ms=20_000) for h in handles))

    async def leaders() -> bool:
        values = [await parted.redis.execute("GET", s.keys.leader) for s in parted.store.partitions]
        return all(v is not None for v in values)

    await wait_until(leaders, what="a leader in every partition")
    assert {w.is_leader for w in worker.group} == {True}
    far = 10**13  # every run's retention ends before this
    assert await parted.cleanup_expired_runs_now(reference_time_ms=far) == 8
    assert await _partition_sizes(parted) == [0] * P


async def test_every_slot_is_used_when_the_backlog_is_split_thinly_over_many_partitions(
    redis_url: str, prefix: str, registry: WorkflowRegistry, make_worker: WorkerFactory
) -> None:
    """100 long runs over 16 partitions (6 or 7 each) and concurrency 100: the siblings that claim last
    find fewer free slots than one claim's threshold (a quarter of the batch), yet must still claim."""
    c = create_client(url=redis_url, prefix=prefix, partitions=16)
    c.registry = registry
    gate = asyncio.Event()

    async def held(ctx: WorkflowHandlerContext) -> Any:
        await gate.wait()
        return ctx.input

    wf = define_workflow("part-thin", handler=held, registry=registry)
    try:
        handles = [await c.enqueue_definition(wf, n) for n in range(100)]
        worker = await make_worker(concurrency=100)
        await wait_until(lambda: worker.inflight() == 100, what="all 100 runs in flight")
        gate.set()
        assert await asyncio.gather(*(h.result(timeout_ms=20_000) for h in handles)) == list(range(100))
    finally:
        await c.close()
