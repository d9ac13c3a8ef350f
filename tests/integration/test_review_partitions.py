"""Review of partitions: attempts to break placement, shared concurrency, budget, stop and queries."""

from __future__ import annotations

import asyncio
import time
import zlib
from datetime import UTC
from typing import Any

import pytest

from redflow import (
    ListRunsParams,
    RedflowClient,
    SearchRunsParams,
    WorkflowHandlerContext,
    WorkflowRegistry,
    create_client,
    define_workflow,
)
from redflow.errors import ConfigurationError
from redflow.storage.keys import partition_of
from redflow.types import WorkflowDebounceOptions

from ..conftest import WorkerFactory, wait_until
from .conftest import PARTED

pytestmark = pytest.mark.timeout(90)

P = PARTED


@pytest.fixture(autouse=True)
def _counts_pinned_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests pin their prefixes' partition counts (or leave them unset on purpose), so the
    suite's REDFLOW_PARTITIONS must not override them."""
    monkeypatch.delenv("REDFLOW_PARTITIONS", raising=False)


async def _client(redis_url: str, prefix: str, registry: WorkflowRegistry | None, partitions: int) -> RedflowClient:
    c = create_client(url=redis_url, prefix=prefix, partitions=partitions)
    c.registry = registry
    await c.store.ensure_ready()
    return c




def _echo(registry: WorkflowRegistry, name: str, **options: Any) -> Any:
    async def echo(ctx: WorkflowHandlerContext) -> Any:
        return await ctx.step.run("echo", lambda: ctx.input)

    return define_workflow(name, handler=echo, registry=registry, **options)


def _part(key: str, count: int = P) -> int:
    return zlib.crc32(key.encode()) % count


# --- placement: keys must land where a single-partition prefix would find them ------------------------


@pytest.mark.parametrize("partitions", [1, P])
async def test_debounce_key_is_one_record_whatever_the_queue_override(
    redis_url: str, prefix: str, registry: WorkflowRegistry, partitions: int
) -> None:
    """The debounce record is db:<wf>:<key> (no queue); placement hashes the queue too."""
    wf = define_workflow(
        "rv-deb", handler=lambda ctx: ctx.input, registry=registry,
        debounce=WorkflowDebounceOptions(key=lambda v: "k", period="10s"),
    )
    name = "rv-deb"

    def aff(q: str) -> str:
        return f"debounce:{len(name)}:{name}:{len(q)}:{q}:k"

    qa = "qa"
    qb = next(f"qb{i}" for i in range(100) if _part(aff(f"qb{i}")) != _part(aff(qa)))
    c = await _client(redis_url, prefix, registry, partitions)
    try:
        first = await c.enqueue_definition(wf, 1, queue_override=qa)
        second = await c.enqueue_definition(wf, 2, queue_override=qb)
        assert second.id == first.id, f"two debounced runs for one key: {first.id} {second.id}"
    finally:
        await c.close()


@pytest.mark.parametrize("partitions", [1, P])
async def test_an_idempotency_key_given_with_a_parent_is_unique_in_the_parents_partition(
    redis_url: str, prefix: str, registry: WorkflowRegistry, partitions: int
) -> None:
    """A run with a parent is placed with its parent (docs/scaling.md): its idempotency key binds
    one run there, whoever starts it; the same key without a parent binds one run in the partition
    the key hashes to, which is the same run only with one partition."""
    _echo(registry, "rv-idem")
    parent_wf = _echo(registry, "rv-idem-parent")
    c = await _client(redis_url, prefix, registry, partitions)
    try:
        key = "the-key"
        home = _part(f"idempotency:{len('rv-idem')}:rv-idem:{key}", partitions)
        parent = None
        for _ in range(20):
            h = await c.enqueue_definition(parent_wf, 0)
            if partitions == 1 or partition_of(h.id) != f"p{home}":
                parent = h
                break
        assert parent is not None
        top = await c.run_by_name("rv-idem", 1, idempotency_key=key)
        child = await c.run_by_name("rv-idem", 2, idempotency_key=key, parent_run_id=parent.id)
        again = await c.run_by_name("rv-idem", 3, idempotency_key=key, parent_run_id=parent.id)
        assert again.id == child.id and partition_of(child.id) == partition_of(parent.id)
        assert (child.id == top.id) is (partitions == 1)
    finally:
        await c.close()


@pytest.mark.parametrize("partitions", [1, P])
async def test_limited_workflow_enqueued_by_name_before_registration_keeps_its_limit(
    redis_url: str, prefix: str, registry: WorkflowRegistry, make_worker: WorkerFactory, partitions: int
) -> None:
    """run_by_name(queue_override=...) of a workflow no worker has registered yet: no meta, so the
    runs are spread; a worker then defines it with max_concurrency=1."""
    running = peak = 0

    async def slow(ctx: WorkflowHandlerContext) -> Any:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        return ctx.input

    blind = await _client(redis_url, prefix, WorkflowRegistry(), partitions)
    try:
        handles = [await blind.run_by_name("rv-lim", n, queue_override="default") for n in range(8)]
        parts = {partition_of(h.id) for h in handles}
        define_workflow("rv-lim", handler=slow, registry=registry, max_concurrency=1)
        await make_worker(concurrency=8)
        outcomes = await asyncio.gather(*(h.result(timeout_ms=20_000) for h in handles), return_exceptions=True)
        assert outcomes == list(range(8))
        assert peak == 1, f"max_concurrency=1 but {peak} ran at once (runs placed in {sorted(parts)})"
    finally:
        await blind.close()


async def test_limited_by_name_after_registration_goes_to_p0(
    redis_url: str, prefix: str, registry: WorkflowRegistry, make_worker: WorkerFactory
) -> None:
    for name, opts in (("rv-mc", {"max_concurrency": 2}),):
        _echo(registry, name, **opts)
    blind = await _client(redis_url, prefix, WorkflowRegistry(), P)
    await make_worker(concurrency=4)
    try:
        hs = [await blind.run_by_name("rv-mc", n) for n in range(8)]
        assert {partition_of(h.id) for h in hs} == {"p0"}
        assert await asyncio.gather(*(h.result(timeout_ms=20_000) for h in hs)) == list(range(8))
    finally:
        await blind.close()


# --- ids naming no partition of the prefix -----------------------------------------------------------


async def test_an_id_naming_a_partition_the_prefix_lacks(parted: RedflowClient, registry: WorkflowRegistry) -> None:
    wf = _echo(registry, "rv-bad")
    real = await parted.enqueue_definition(wf, 1)
    base = real.id.rsplit("-", 1)[0]
    for suffix in ("p9", "p4", "p256"):
        fake = f"{base}-{suffix}"
        assert await parted.get_run(fake) is None
        assert await parted.cancel_run(fake) is False
    # the same ulid under p0 must not be confused either
    if partition_of(real.id) != "p0":
        assert await parted.get_run(f"{base}-p0") is None


# --- shared concurrency -------------------------------------------------------------------------------


@pytest.mark.parametrize(("partitions", "concurrency", "batch"), [(8, 3, 2), (8, 1, 64), (6, 5, 1), (4, 8, 3)])
async def test_shared_concurrency_never_exceeded_and_never_stalls(
    redis_url: str, prefix: str, registry: WorkflowRegistry, make_worker: WorkerFactory,
    partitions: int, concurrency: int, batch: int,
) -> None:
    running = peak = 0

    async def slow(ctx: WorkflowHandlerContext) -> Any:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.005 * (ctx.input % 4))
        running -= 1
        return ctx.input

    wf = define_workflow("rv-conc", handler=slow, registry=registry)
    c = await _client(redis_url, prefix, registry, partitions)
    try:
        hs = [await c.enqueue_definition(wf, n) for n in range(20)]
        worker = await make_worker(concurrency=concurrency, claim_batch_size=batch, blmove_timeout_sec=30.0)
        # while running, enqueue more into every partition (bells while the group is full)
        hs += await c.enqueue_many(wf, list(range(20, 60)))
        t0 = time.monotonic()
        assert await asyncio.gather(*(h.result(timeout_ms=30_000) for h in hs)) == list(range(60))
        elapsed = time.monotonic() - t0
        assert peak <= concurrency, f"peak {peak} > concurrency {concurrency}"
        await wait_until(lambda: worker.primary._reserved == 0, what="no reservation left")
        # 60 runs of <=15 ms each: with a 30 s block timeout a stalled partition would show up here
        assert elapsed < 15, f"took {elapsed:.1f}s: some partition waited out its block timeout"
    finally:
        await c.close()


# --- run budget -----------------------------------------------------------------------------------------


async def test_run_budget_is_shared_by_the_siblings(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory
) -> None:
    wf = _echo(registry, "rv-budget")
    worker = await make_worker(concurrency=8, claim_batch_size=3)
    worker.run_budget = 5
    hs = await parted.enqueue_many(wf, list(range(40)))
    await asyncio.wait_for(worker.budget_spent.wait(), 10)
    await wait_until(lambda: worker.inflight() == 0, what="in-flight runs done")
    claimed = sum(w.runs_claimed for w in worker.group)
    assert claimed == 5, f"claimed {claimed} with a budget of 5"
    stats = await parted.get_stats()
    assert stats["by_status"]["succeeded"] == 5
    assert stats["backlog"]["default"]["ready"] == 35
    del hs


# --- stop with runs in flight in several partitions ------------------------------------------------------


async def test_stop_grace_and_hand_back_in_every_partition(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory
) -> None:
    started: dict[str, int] = {}

    async def job(ctx: WorkflowHandlerContext) -> Any:
        started[ctx.run.id] = started.get(ctx.run.id, 0) + 1
        await ctx.step.run("first", lambda: 1)
        await asyncio.sleep(0.2 if ctx.input % 2 == 0 else 30)
        return ctx.input

    wf = define_workflow("rv-stop", handler=job, registry=registry)
    first = await make_worker(concurrency=8)
    hs = await parted.enqueue_many(wf, list(range(8)))
    assert len({partition_of(h.id) for h in hs}) == P
    await wait_until(lambda: len(started) == 8, what="eight runs started")
    t0 = time.monotonic()
    await first.stop(grace_period_ms=1500)
    assert time.monotonic() - t0 < 15  # the long runs sleep 30 s: the grace period cut them short
    for h in hs:
        run = await parted.get_run(h.id)
        assert run is not None
        if h.id and run["status"] == "succeeded":
            continue
        assert run["status"] == "queued", (h.id, run["status"])
    done = [h for h in hs if (await parted.get_run(h.id))["status"] == "succeeded"]  # type: ignore[index]
    assert len(done) == 4
    # a second worker picks up the handed-back runs; shorten them
    await make_worker(concurrency=8)
    await wait_until(lambda: all(v == 2 for k, v in started.items() if k not in {h.id for h in done}),
                     what="handed-back runs started again")


# --- queries --------------------------------------------------------------------------------------------


async def test_listing_by_status_time_and_running_across_partitions(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory
) -> None:
    gate = asyncio.Event()

    async def job(ctx: WorkflowHandlerContext) -> Any:
        if ctx.input % 3 == 0:
            await gate.wait()
        if ctx.input % 3 == 1:
            raise ValueError("boom")
        return ctx.input

    wf = define_workflow("rv-q", handler=job, registry=registry, max_attempts=1)
    hs = [await parted.enqueue_definition(wf, n) for n in range(24)]
    mid = int(time.time() * 1000) + 1
    await asyncio.sleep(0.01)
    later = [await parted.enqueue_definition(wf, n) for n in (30, 32, 35)]
    hs += later
    await make_worker(concurrency=12)
    await wait_until(lambda: parted.get_stats(), what="stats")

    async def settled() -> bool:
        st = (await parted.get_stats())["by_status"]
        return st["running"] == 9 and st["failed"] == 8 and st["succeeded"] == 10

    await wait_until(settled, what="9 running, 8 failed, 10 succeeded")
    by_id = {h.id: h for h in hs}
    for status, expect in (("running", 9), ("failed", 8), ("succeeded", 10)):
        for sort in ("asc", "desc"):
            seen: list[str] = []
            cursor = None
            while True:
                page = await parted.list_runs(ListRunsParams(status=status, limit=2, cursor=cursor, sort=sort))
                if not page:
                    break
                seen += [r["id"] for r in page]
                cursor = page[-1]["cursor"]
            assert len(seen) == expect == len(set(seen)), (status, sort, len(seen))
            assert seen == sorted(seen, reverse=sort == "desc")
            assert set(seen) <= set(by_id)
    found = await parted.search_runs(SearchRunsParams(created_after=mid, limit=100))
    assert sorted(r["id"] for r in found["runs"]) == sorted(h.id for h in later)
    found = await parted.search_runs(SearchRunsParams(created_before=mid, status="failed", limit=3))
    ids = [r["id"] for r in found["runs"]]
    while found["cursor"]:
        found = await parted.search_runs(SearchRunsParams(created_before=mid, status="failed", limit=3,
                                                          cursor=found["cursor"]))
        ids += [r["id"] for r in found["runs"]]
    assert len(ids) == len(set(ids)) == 8
    found = await parted.search_runs(SearchRunsParams(status="running", query="rv-q", limit=4))
    ids = [r["id"] for r in found["runs"]]
    while found["cursor"]:
        found = await parted.search_runs(SearchRunsParams(status="running", query="rv-q", limit=4,
                                                          cursor=found["cursor"]))
        ids += [r["id"] for r in found["runs"]]
    assert len(set(ids)) == 9
    gate.set()


async def test_operator_actions_on_runs_outside_p0(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory
) -> None:
    calls: dict[str, int] = {}
    fail = {"on": True}

    async def job(ctx: WorkflowHandlerContext) -> Any:
        async def once() -> int:
            calls[ctx.run.id] = calls.get(ctx.run.id, 0) + 1
            return 7

        v = await ctx.step.run("once", once)
        if fail["on"]:
            raise ValueError("nope")
        return v + ctx.input

    wf = define_workflow("rv-ops", handler=job, registry=registry, max_attempts=1)
    await make_worker(concurrency=8)
    hs = await parted.enqueue_many(wf, list(range(8)))
    await wait_until(lambda: parted.get_stats(), what="")

    async def failed() -> bool:
        return (await parted.get_stats())["by_status"]["failed"] == 8

    await wait_until(failed, what="8 failed")
    fail["on"] = False
    outside = [h for h in hs if partition_of(h.id) != "p0"]
    one = outside[0]
    await parted.retry_run(one.id)
    assert await one.result(timeout_ms=10_000) == 7 + (await parted.get_run(one.id))["input"]  # type: ignore[index]
    replay = await parted.replay_run(outside[1].id)
    assert partition_of(replay.id) == partition_of(outside[1].id)
    assert await replay.result(timeout_ms=10_000) is not None
    res = await parted.retry_runs({"workflow": "rv-ops", "status": "failed"})
    assert res["done"] == 7, res
    out = await asyncio.gather(*(h.result(timeout_ms=10_000) for h in hs))
    assert sorted(out) == sorted(7 + n for n in range(8))
    assert all(v == 1 for v in calls.values()), calls  # the recorded step never ran again

    gate = asyncio.Event()

    async def blocked(ctx: WorkflowHandlerContext) -> Any:
        await gate.wait()

    bw = define_workflow("rv-block", handler=blocked, registry=registry)
    # queued and scheduled runs in every partition, plus running ones
    from datetime import datetime, timedelta
    later = datetime.now(UTC) + timedelta(hours=1)
    bhs = await parted.enqueue_many(bw, list(range(8)))
    shs = [await parted.enqueue_definition(bw, n, run_at=later) for n in range(4)]
    assert len({partition_of(h.id) for h in shs}) == P
    res = await parted.cancel_runs({"workflow": "rv-block"})
    assert res["matched"] == 12 and res["done"] == 12, res
    assert (await parted.get_stats())["backlog"]["default"] == {"ready": 0, "scheduled": 0}
    gate.set()
    del bhs


async def test_two_clients_create_one_prefix_with_different_counts_concurrently(redis_url: str) -> None:
    import uuid

    for _ in range(30):
        prefix = f"rft:{uuid.uuid4().hex[:12]}"
        a = create_client(url=redis_url, prefix=prefix, partitions=4)
        b = create_client(url=redis_url, prefix=prefix, partitions=2)
        n = create_client(url=redis_url, prefix=prefix)
        try:
            out = await asyncio.gather(a.store.ensure_ready(), b.store.ensure_ready(), n.store.ensure_ready(),
                                       return_exceptions=True)
            ok = [c for c, o in zip((a, b, n), out, strict=True) if not isinstance(o, BaseException)]
            errs = [o for o in out if isinstance(o, BaseException)]
            assert all(isinstance(e, ConfigurationError) for e in errs), errs
            counts = {c.partition_count for c in ok}
            assert len(counts) == 1, counts
            recorded = int(await a.redis.execute("GET", a.keys.partitions))
            assert counts == {recorded}
        finally:
            for c in (a, b, n):
                await c.close()


async def test_killed_connections_every_partition_recovers(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory
) -> None:
    wf = _echo(registry, "rv-kill")
    gate = asyncio.Event()
    started: set[str] = set()

    async def blocked(ctx: WorkflowHandlerContext) -> Any:
        started.add(ctx.run.id)
        await gate.wait()

    bw = define_workflow("rv-kill-block", handler=blocked, registry=registry)
    worker = await make_worker(concurrency=8, blmove_timeout_sec=60.0, watchdog_stalled_for_ms=90000)
    await wait_until(lambda: worker.ready, what="ready")

    async def on_every_master(*command: Any) -> list[Any]:  # a cluster answers CLIENT per node
        return [await node.execute(*command) for node in await parted.redis.masters()]

    async def blocked_waits() -> bool:  # every sibling in its BRPOP
        lists = await on_every_master("CLIENT", "LIST", "TYPE", "normal")
        return sum(text.count(b"cmd=brpop") for text in lists) >= P

    await wait_until(blocked_waits, what="every sibling blocked on its bells")
    killed = sum(int(n) for n in await on_every_master("CLIENT", "KILL", "TYPE", "normal"))
    assert killed >= P
    t0 = time.monotonic()
    hs = await parted.enqueue_many(wf, list(range(8)))
    assert await asyncio.gather(*(h.result(timeout_ms=15_000) for h in hs)) == list(range(8))
    assert time.monotonic() - t0 < 20, f"bells lost: {time.monotonic() - t0:.1f}s"  # a lost bell waits 60 s

    bhs = await parted.enqueue_many(bw, list(range(P)))
    await wait_until(lambda: len(started) == P, what="one blocked run per partition")
    killed = sum(int(n) for n in await on_every_master("CLIENT", "KILL", "TYPE", "pubsub"))
    assert killed >= P
    for h in bhs:  # the request is in the header: a resubscribed worker re-reads it
        assert await parted.cancel_run(h.id)
    for h in bhs:
        with pytest.raises(Exception, match="cancel"):
            await h.result(timeout_ms=10_000)


async def test_cron_fires_once_per_slot_under_partitions(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory
) -> None:
    from redflow.types import CronTrigger

    fired: list[str] = []

    async def tick(ctx: WorkflowHandlerContext) -> Any:
        fired.append(ctx.run.id)
        return 1

    define_workflow("rv-cron", handler=tick, registry=registry, cron=[CronTrigger(expression="* * * * * *")])
    await make_worker(concurrency=4, lease_ms=900)
    await make_worker(concurrency=4, lease_ms=900)
    await wait_until(lambda: len(fired) >= 3, timeout_s=15, what="three cron runs")
    slots = [f.split("-")[0] for f in fired]
    assert len(fired) == len(set(fired))
    del slots


@pytest.mark.parametrize("partitions", [1, P])
async def test_a_partitioned_prefix_has_a_layout_name_older_redflow_refuses(
    redis_url: str, prefix: str, registry: WorkflowRegistry, partitions: int
) -> None:
    """redflow from before partitions accepts exactly STORAGE_VERSION in a prefix's version key, so a
    prefix with several partitions must carry another name in every partition (else an old worker
    would adopt it as one partition and never read p1..)."""
    from redflow.storage.keys import PARTITIONED_VERSION, STORAGE_VERSION, PartitionKeys

    c = await _client(redis_url, prefix, registry, partitions)
    try:
        expected = STORAGE_VERSION if partitions == 1 else PARTITIONED_VERSION
        assert expected != STORAGE_VERSION or partitions == 1
        for n in range(partitions):
            assert await c.redis.execute("GET", PartitionKeys(prefix, f"p{n}").version) == expected.encode()
    finally:
        await c.close()
    again = await _client(redis_url, prefix, registry, partitions)  # this version reopens it
    await again.close()


async def test_scheduled_and_retried_runs_start_on_time_in_every_partition(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory
) -> None:
    from datetime import datetime, timedelta

    started: dict[str, float] = {}
    attempts: dict[str, int] = {}

    async def job(ctx: WorkflowHandlerContext) -> Any:
        attempts[ctx.run.id] = attempts.get(ctx.run.id, 0) + 1
        started[ctx.run.id] = time.monotonic()
        if ctx.input == "retry" and attempts[ctx.run.id] == 1:
            raise ValueError("again")
        return ctx.input

    wf = define_workflow("rv-sched", handler=job, registry=registry, max_attempts=2)
    await make_worker(concurrency=2, blmove_timeout_sec=30.0, watchdog_stalled_for_ms=90000)
    await asyncio.sleep(0.3)  # siblings in their blocking waits
    t0 = time.monotonic()
    at = datetime.now(UTC) + timedelta(milliseconds=600)
    hs = [await parted.enqueue_definition(wf, "s", run_at=at) for _ in range(P)]
    hs += [await parted.enqueue_definition(wf, "retry") for _ in range(P)]
    assert len({partition_of(h.id) for h in hs}) == P
    assert await asyncio.gather(*(h.result(timeout_ms=20_000) for h in hs)) == ["s"] * P + ["retry"] * P
    late = {partition_of(h.id): round(started[h.id] - t0, 2) for h in hs}
    assert max(started[h.id] - t0 for h in hs) < 10, late  # a missed wake-up waits the 30 s block


async def test_cleanup_limit_and_fresh_client_reads_outside_p0(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory, redis_url: str, prefix: str
) -> None:
    from redflow.client.handle import RunHandle

    wf = _echo(registry, "rv-fresh")
    await make_worker(concurrency=4)
    hs = await parted.enqueue_many(wf, list(range(8)))
    await asyncio.gather(*(h.result(timeout_ms=10_000) for h in hs))
    one = next(h for h in hs if partition_of(h.id) == "p2")
    for call in ("result", "get_run", "get_run_steps", "get_run_attempts", "explain_run", "cancel_run"):
        fresh = create_client(url=redis_url, prefix=prefix)
        try:
            if call == "result":
                got: Any = await RunHandle(fresh, one.id).result(timeout_ms=3000)
                assert got == (await parted.get_run(one.id))["output"], call  # type: ignore[index]
            elif call == "cancel_run":
                assert await fresh.cancel_run(one.id) is False
            else:
                got = await getattr(fresh, call)(one.id)
                assert got, (call, got)
                if call == "get_run":
                    assert got["status"] == "succeeded"
                if call == "get_run_steps":
                    assert [s["name"] for s in got] == ["echo"], got
        finally:
            await fresh.close()
    far = 10**13
    assert await parted.cleanup_expired_runs_now(reference_time_ms=far, limit=3) == 3
    assert await parted.cleanup_expired_runs_now(reference_time_ms=far, limit=100) == 5


@pytest.mark.parametrize(("budget", "batch"), [(1, 1), (3, 64), (7, 2)])
async def test_small_run_budgets_over_many_partitions(
    redis_url: str, prefix: str, registry: WorkflowRegistry, make_worker: WorkerFactory, budget: int, batch: int
) -> None:
    wf = _echo(registry, "rv-budget2")
    c = await _client(redis_url, prefix, registry, 8)
    try:
        worker = await make_worker(concurrency=8, claim_batch_size=batch)
        worker.run_budget = budget
        await c.enqueue_many(wf, list(range(40)))
        await asyncio.wait_for(worker.budget_spent.wait(), 10)
        await wait_until(lambda: worker.inflight() == 0 and worker.primary._reserved == 0, what="idle")
        await asyncio.sleep(0.3)
        assert sum(w.runs_claimed for w in worker.group) == budget
        assert (await c.get_stats())["by_status"]["succeeded"] == budget
    finally:
        await c.close()


async def test_limited_runs_in_p0_do_not_starve_the_other_partitions(
    parted: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory
) -> None:
    async def slow(ctx: WorkflowHandlerContext) -> Any:
        await asyncio.sleep(1.0)
        return ctx.input

    lim = define_workflow("rv-lim-slow", handler=slow, registry=registry, max_concurrency=1)
    fast = _echo(registry, "rv-fast")
    await make_worker(concurrency=4)
    lh = [await parted.enqueue_definition(lim, n) for n in range(10)]
    fh = await parted.enqueue_many(fast, list(range(40)))
    t0 = time.monotonic()
    await asyncio.gather(*(h.result(timeout_ms=20_000) for h in fh))
    assert time.monotonic() - t0 < 6  # starved behind the limited runs it would take 10 s
    await asyncio.gather(*(h.result(timeout_ms=20_000) for h in lh))
