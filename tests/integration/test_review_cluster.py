"""Review attacks on today's Redis Cluster support, on the suite's cluster (REDFLOW_TEST_CLUSTER=3;
the tests taking the ``cluster`` fixture are skipped on a single server): planned topology changes (a
slot moved to another master, half-moved slots answering ASK and TRYAGAIN) under blocking reads,
scripts and a worker's finish; slot-map refreshes and the connections they open. Claim batching (one
claim against one-at-a-time claiming, a 2000-run claim) and workflow-filtered listings run on either.

Each test that failed on the engine when it was written names the bug it covers.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from typing import Any

import pytest

from redflow import (
    ListRunsParams,
    RedflowClient,
    WorkflowHandlerContext,
    WorkflowRateLimitOptions,
    WorkflowRegistry,
    create_client,
    define_workflow,
)
from redflow.encoding import decode
from redflow.storage.codes import Code

from ..cluster_harness import ClusterNode, LocalCluster, prefix_slot
from ..conftest import WorkerFactory, wait_until
from ..partitioned import pin_spread


def _other_master(cluster: LocalCluster, node: ClusterNode) -> ClusterNode:
    return next(m for m in cluster.masters() if m is not node)


def _begin_move(cluster: LocalCluster, slot: int) -> tuple[ClusterNode, ClusterNode]:
    source = cluster.slot_owner(slot)
    target = _other_master(cluster, source)
    target.execute("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
    source.execute("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
    return source, target


def _migrate(source: ClusterNode, target: ClusterNode, keys: list[str]) -> None:
    if keys:
        source.execute("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys)


def _keys_in_slot(node: ClusterNode, slot: int) -> list[str]:
    return list(node.execute("CLUSTER", "GETKEYSINSLOT", slot, 100_000))


def _finish_move(cluster: LocalCluster, slot: int, source: ClusterNode, target: ClusterNode) -> None:
    _migrate(source, target, _keys_in_slot(source, slot))
    for node in [target, source, *(m for m in cluster.masters() if m not in (source, target))]:
        node.execute("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)


# --- blocking stream reads across a planned slot move ---------------------------------------------


@pytest.mark.usefixtures("one_partition")  # one prefix, one slot
async def test_read_stream_keeps_reading_across_a_slot_move(
    cluster: LocalCluster, client: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory,
) -> None:
    go = asyncio.Event()

    async def streamer(ctx: WorkflowHandlerContext) -> str:
        assert ctx.stream is not None
        await ctx.stream.write(1)
        await go.wait()
        await ctx.stream.write(2)
        return "done"

    wf = define_workflow("review-stream-move", handler=streamer, stream=True, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    reader = await client.read_stream(handle.id, block_ms=20_000)
    assert reader is not None
    chunks = reader.__aiter__()
    first = await asyncio.wait_for(chunks.__anext__(), 15)
    assert first.record["value"] == 1
    second = asyncio.ensure_future(chunks.__anext__())  # blocks in XREAD BLOCK on the current owner
    slot = prefix_slot(client.prefix)
    source = cluster.slot_owner(slot)
    await wait_until(lambda: "cmd=xread" in str(source.execute("CLIENT", "LIST")), timeout_s=10,
                     what="the reader blocked on the owner")
    await asyncio.to_thread(cluster.move_slot, slot, _other_master(cluster, source), 10)
    go.set()
    try:
        got = await asyncio.wait_for(second, 25)
        assert got.record["value"] == 2
        assert await handle.result(timeout_ms=15_000) == "done"
    finally:
        second.cancel()
        await reader.aclose()


@pytest.mark.usefixtures("one_partition")  # one prefix, one slot
async def test_result_wait_and_an_idle_worker_follow_a_slot_move(
    cluster: LocalCluster, client: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory,
) -> None:
    """The handle's subscription stays on the old owner (the completion message reaches it over the
    bus); the idle worker's BRPOP is answered MOVED and it claims on the new owner."""
    gate = asyncio.Event()

    async def gated(ctx: WorkflowHandlerContext) -> Any:
        if ctx.input == "gated":
            await gate.wait()
        return ctx.input

    wf = define_workflow("review-move-wait", handler=gated, registry=registry)
    await make_worker(concurrency=2)
    gated_run = await client.enqueue_definition(wf, "gated")
    waiting = asyncio.ensure_future(gated_run.result(timeout_ms=30_000))
    assert await (await client.enqueue_definition(wf, "warm")).result(timeout_ms=15_000) == "warm"
    slot = prefix_slot(client.prefix)
    source = cluster.slot_owner(slot)
    await asyncio.to_thread(cluster.move_slot, slot, _other_master(cluster, source), 10)
    began = time.monotonic()
    fresh = await client.enqueue_definition(wf, "after")  # rings the bell on the new owner
    assert await fresh.result(timeout_ms=15_000) == "after"
    assert time.monotonic() - began < 5
    gate.set()
    assert await asyncio.wait_for(waiting, 10) == "gated"


# --- ASK, then NOSCRIPT on the importing node ----------------------------------------------------


@pytest.mark.usefixtures("one_partition")  # one prefix, one slot
async def test_script_after_ask_to_a_node_without_it_falls_back_to_eval_with_asking(
    cluster: LocalCluster, client: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory,
) -> None:
    """Every key of the slot already on the target, the slot still migrating: the source answers ASK,
    the target (scripts flushed) NOSCRIPT; the EVAL fallback must go through ASK/ASKING again."""

    async def one_step(ctx: WorkflowHandlerContext) -> Any:
        return await ctx.step.run("only", lambda: ctx.input)

    wf = define_workflow("review-ask-noscript", handler=one_step, registry=registry)
    worker = await make_worker()
    handle = await client.enqueue_definition(wf, 5)
    assert await handle.result(timeout_ms=15_000) == 5
    await worker.stop(grace_period_ms=0)
    slot = prefix_slot(client.prefix)
    source, target = _begin_move(cluster, slot)
    try:
        target.execute("SCRIPT", "FLUSH")
        _migrate(source, target, _keys_in_slot(source, slot))
        assert source.execute("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
        counters = client.redis.counters.by_name
        asking, evals = counters["ASKING"], counters["EVAL"]
        steps = await client.store.read_steps(handle.id)  # history.lua: one key
        assert [s.name for s in steps] == ["only"]
        # EVALSHA: source (ASK), target (NOSCRIPT); EVAL: source (ASK), target: each to the target with ASKING.
        assert counters["EVAL"] == evals + 2
        assert counters["ASKING"] == asking + 2
    finally:
        _finish_move(cluster, slot, source, target)
    assert await client.get_run_steps(handle.id)  # MOVED once, then the target (scripts cached by EVAL)


# --- a worker's finish while the slot stays half-moved for longer than the router's retries -------


@pytest.mark.timeout(150)
@pytest.mark.parametrize("lease_ms", [5_000, 60_000])
@pytest.mark.usefixtures("one_partition")  # one prefix, one slot
async def test_finish_refused_by_tryagain_is_recorded_after_the_move_completes(
    cluster: LocalCluster, client: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory,
    lease_ms: int,
) -> None:
    """A half-moved slot answers every multi-key script TRYAGAIN (some of its keys on each side);
    the router retries for ~13 s, then raises ClusterUnavailableError. With the default lease the
    lease guard stops the run first (the heartbeat meets TRYAGAIN too); with a long one the finish
    itself gives up. Either way the run must end once, its recorded step not run again."""
    executed: collections.Counter[str] = collections.Counter()
    release = asyncio.Event()

    async def two_phase(ctx: WorkflowHandlerContext) -> Any:
        executed["body"] += 1
        a = await ctx.step.run("a", lambda: executed.update(["a"]) or ctx.input)
        await release.wait()
        return {"a": a}

    wf = define_workflow("review-tryagain-finish", handler=two_phase, registry=registry)
    await client.sync_registry()
    worker = await make_worker(lease_ms=lease_ms)
    handle = await client.enqueue_definition(wf, 3)
    await wait_until(lambda: executed["a"] == 1, timeout_s=15, what="step a recorded")
    slot = prefix_slot(client.prefix)
    source, target = _begin_move(cluster, slot)
    try:
        # Split the slot: the run headers go, everything else stays.
        _migrate(source, target, [client.keys.runs])
        release.set()
        # The finish meets TRYAGAIN until the router gives up; the execution then leaves the worker.
        # (Valkey: the source answers TRYAGAIN itself, 8 tries over ~13 s. Redis 6.2: the source answers
        # ASK and the target TRYAGAIN, and the ASK hops use half of the router's 8 tries: ~0.75 s.)
        await wait_until(lambda: handle.id not in worker.active, timeout_s=40, interval_s=0.1,
                         what="the refused finish to give up")
    finally:
        await asyncio.to_thread(_finish_move, cluster, slot, source, target)
    assert await handle.result(timeout_ms=60_000) == {"a": 3}
    assert executed["a"] == 1, "a recorded step ran again"
    run = await client.get_run(handle.id)
    assert run is not None and run["status"] == "succeeded"
    assert await client.redis.execute("HLEN", client.keys.leases) == 0
    assert await client.redis.execute("HLEN", client.keys.running) == 0


# --- slot-map refreshes and the connections they open ------------------------------------------------


def _connected_clients(cluster: LocalCluster) -> dict[int, int]:
    return {n.port: int(n.info("clients")["connected_clients"]) for n in cluster.masters()}


async def test_slot_map_refreshes_leave_no_orphaned_connections(cluster: LocalCluster, redis_url: str,
                                                                 prefix: str) -> None:
    c = create_client(url=redis_url, prefix=prefix)
    try:
        await c.store.ensure_ready()  # every master has been used (the foreign-layout markers)
        router = c.redis._router
        assert router is not None
        seed_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
        owner = cluster.slot_owner(prefix_slot(prefix))
        quiet = next((m for m in cluster.masters() if m.port != seed_port and m is not owner),
                     next(m for m in cluster.masters() if m.port != seed_port))
        node = next(n for n in await c.redis.masters() if n.address.port == quiet.port)
        # The server drops this process's idle connection to a master it rarely talks to.
        quiet.execute("CLIENT", "KILL", "TYPE", "normal")
        await wait_until(lambda: node._conn is None or node._conn.closed, timeout_s=5, what="the drop seen")
        before = _connected_clients(cluster)
        for _ in range(10):  # what MOVED replies and lost nodes schedule, at most every 0.2 s
            shared = node._conn
            if shared is not None and not shared.closed:  # the last refresh kept it: drop it again
                quiet.execute("CLIENT", "KILL", "ID", int(await node.execute("CLIENT", "ID")))
                await wait_until(lambda shared=shared: shared.closed, timeout_s=5, what="the drop seen")
            await router.refresh()
    finally:
        await c.close()
    await wait_until(lambda: _connected_clients(cluster)[quiet.port] <= before[quiet.port], timeout_s=5,
                     interval_s=0.1, what=f"the client's connections to {quiet.name} to close")


# --- claim batching: one call against one-at-a-time claiming -----------------------------------------


async def _noop(ctx: WorkflowHandlerContext) -> None:
    return None


def _claim_registry() -> WorkflowRegistry:
    registry = WorkflowRegistry()
    define_workflow("rv-capped", handler=_noop, max_concurrency=2, registry=registry)
    define_workflow("rv-mutex", handler=_noop, mutex=lambda value: str(value["k"]), registry=registry)
    define_workflow("rv-plain", handler=_noop, registry=registry)
    define_workflow("rv-limited", handler=_noop, registry=registry,
                    rate_limit=WorkflowRateLimitOptions(key=lambda value: "all", limit=100, period=60_000))
    define_workflow("rv-lapses", handler=_noop, registry=registry)
    return registry


async def _mixed_ready_list(client: RedflowClient) -> list[str]:
    """One ready list mixing every kind a claim meets, in a fixed order; returns the run ids in
    enqueue order. A hook (failed by three lapses, on_failure pending) is oldest."""
    reg = client.registry_or_default()
    store, keys, redis = client.store, client.keys, client.redis
    await client.sync_registry()
    # The list under test is one partition's: with several partitions, the plain runs that would be
    # spread over them are all placed in p0, where the limited ones go anyway.
    pin_spread(client, 0)
    leader = (await store.heartbeat("boss", 60_000, 60_000, True)).leader
    hook = await client.enqueue_definition(reg.get("rv-lapses"), "hook")
    for lapse in range(1, 4):
        wid = f"lapser{lapse}"
        await store.heartbeat(wid, 60_000, 60_000, False)
        _, _, runs = await store.claim(wid, ["default"], 1, 10)
        assert [r.id for r in runs] == [hook.id]
        await redis.execute("ZADD", keys.workers, 0, wid)
        assert (await store.reap(leader, wid, 3, 60_000, 10))[0] is Code.OK
    ids = [hook.id]

    async def add(name: str, value: Any) -> str:
        handle = await client.enqueue_definition(reg.get(name), value)
        ids.append(handle.id)
        return handle.id

    capped = [await add("rv-capped", n) for n in range(3)]
    await add("rv-mutex", {"k": "a", "n": 0})
    doomed = await add("rv-plain", "canceled")
    await redis.execute("LPUSH", keys.ready("default"), capped[0])  # listed twice
    await add("rv-mutex", {"k": "a", "n": 1})
    await add("rv-limited", 0)
    await redis.execute("LPUSH", keys.ready("default"), "01M8ZZZZZZZZZZZZZZZZZZZZZZ-p0")  # header gone
    await add("rv-capped", 3)
    await add("rv-mutex", {"k": "b", "n": 2})
    await add("rv-plain", "last")
    await redis.execute("LPUSH", keys.ready("default"), doomed)  # a canceled run listed again
    assert await client.cancel_run(doomed)
    return ids


async def _claim_state(client: RedflowClient, ids: list[str], claimed: list[tuple[str, str]]) -> dict[str, Any]:
    """What a claim sequence left behind, by enqueue position (ids differ between prefixes)."""
    pos = {run_id: i for i, run_id in enumerate(ids)}
    headers = await client.store.read_headers(ids)
    k, redis = client.keys, client.redis
    mutexes = await redis.execute("HGETALL", k.mutexes)
    return {
        "claimed": [(pos[i], kind) for i, kind in claimed],
        "status": [h.status if h else None for h in headers],
        "held": sorted(pos[m.decode().rsplit(":", 1)[1]] for m in await redis.execute("ZRANGE", k.held, 0, -1)),
        "counts": await client.store.index.status_counts(),
        "leases": sorted(pos[i.decode()] for i in await redis.execute("HKEYS", k.leases)),
        "owned": sorted(pos[i.decode()] for i in await redis.execute("SMEMBERS", k.owned("w"))),
        "mutexes": sorted((mutexes[i].decode(), pos[mutexes[i + 1].decode()]) for i in range(0, len(mutexes), 2)),
        "ready": await redis.execute("LLEN", k.ready("default")),
    }


@pytest.mark.parametrize("batch_size", [100, 8, 3])
async def test_one_claim_of_a_mixed_batch_equals_claiming_one_at_a_time(redis_url: str, batch_size: int) -> None:
    """8: exactly the claimable runs, with skipped ones among them; 3: batches end mid-list."""
    registry = _claim_registry()
    base = f"rft:{uuid.uuid4().hex[:8]}"
    batch, single = (create_client(url=redis_url, prefix=f"{base}:{name}") for name in ("batch", "single"))
    try:
        states = []
        for c, want in ((batch, batch_size), (single, 1)):
            c.registry = registry
            ids = await _mixed_ready_list(c)
            await c.store.heartbeat("w", 60_000, 60_000, False)
            claimed: list[tuple[str, str]] = []
            while True:
                code, _, runs = await c.store.claim("w", ["default"], want, 10)
                assert code is Code.OK
                claimed += [(r.id, r.kind) for r in runs]
                if not runs:
                    break
            states.append(await _claim_state(c, ids, claimed))
        assert states[0] == states[1]
        got = states[0]
        # The hook, capped 0 and 1 (2 and 3 held: the limit counts runs this claim started), the mutex
        # and rate-limited runs as admissions, the last plain run; the canceled run, the missing
        # header and the repeated id skipped.
        assert got["claimed"] == [(0, "hook"), (1, "run"), (2, "run"), (4, "admit"), (6, "admit"), (7, "admit"),
                                  (9, "admit"), (10, "run")]
        assert got["held"] == [3, 8]
        assert got["counts"]["running"] == 3 and got["ready"] == 0
    finally:
        await batch.close()
        await single.close()


@pytest.mark.timeout(120)
async def test_a_claim_of_2000_runs_over_the_lua_slices(client: RedflowClient, registry: WorkflowRegistry) -> None:
    """RPOP takes at most 500 ids a time; headers, leases, owned and the index are written in slices
    of 1000 arguments; inputs are read back in slices: a 2000-run claim crosses every boundary."""
    wf = define_workflow("rv-wide", handler=_noop, registry=registry, max_concurrency=1700)
    await client.sync_registry()
    handles = await client.enqueue_many(wf, list(range(2600)))
    store = client.store
    await store.heartbeat("w", 60_000, 60_000, False)
    code, _, runs = await store.claim("w", ["default"], 2000, 10)
    assert code is Code.OK and len(runs) == 1700  # the limit counts the runs this claim started
    assert [r.id for r in runs] == [h.id for h in handles[:1700]]
    assert [decode(r.input) for r in runs[::97]] == list(range(0, 1700, 97))
    assert len({r.token for r in runs}) == 1700
    redis, k = client.redis, client.keys
    assert await redis.execute("HLEN", k.leases) == 1700
    assert await redis.execute("SCARD", k.owned("w")) == 1700
    assert (await store.index.status_counts())["running"] == 1700
    # The claim goes on popping after the limit is reached (held runs do not count toward its 2000),
    # as one-at-a-time claiming did: every remaining run is held aside by this one call.
    assert await redis.execute("ZCARD", k.held) == 900
    assert await redis.execute("LLEN", k.ready("default")) == 0


# --- workflow-filtered listings (the run index lost its w: member) ------------------------------------


async def test_list_runs_by_workflow_pages_every_status_once_across_status_changes(
    client: RedflowClient, registry: WorkflowRegistry,
) -> None:
    wf = define_workflow("rv-listed", handler=_noop, registry=registry)
    # Its name extends the first; on its own queue, so claims below take only the listed workflow's runs.
    other = define_workflow("rv-listed-x", handler=_noop, queue="rv-other", registry=registry)
    await client.sync_registry()
    ids = [h.id for h in await client.enqueue_many(wf, list(range(30)))]
    await client.enqueue_many(other, list(range(5)))
    store = client.store
    for s in store.partitions:
        await s.heartbeat("w", 60_000, 60_000, False)

    async def claim(most: int) -> list[Any]:  # from every partition (the runs are spread over them)
        got: list[Any] = []
        for s in store.partitions:
            got += (await s.claim("w", ["default"], most - len(got), 10))[2] if len(got) < most else []
        return got

    runs = await claim(10)  # 10 running, the rest queued
    assert len(runs) == 10
    for r in runs[:4]:
        await store.finish(r.id, r.token, "w", "succeeded", b"1", False, 60_000, "default")
    claimed = {r.id for r in runs}
    for run_id in [i for i in ids if i not in claimed][10:13]:  # three queued runs
        assert await client.cancel_run(run_id)
    for sort in ("asc", "desc"):
        listed: list[str] = []
        cursor = None
        pages = 0
        while True:
            page = await client.list_runs(ListRunsParams(workflow="rv-listed", cursor=cursor, limit=7, sort=sort))
            if not page:
                break
            listed += [r["id"] if isinstance(r, dict) else r.id for r in page]
            cursor = listed[-1]
            pages += 1
            if pages == 2:  # runs change status between pages: each is still listed once
                late = await claim(30)
                for r in late:
                    await store.finish(r.id, r.token, "w", "failed", b'{"message":"x"}', False, 60_000, "default")
        assert listed == sorted(ids, reverse=sort == "desc")  # id order (ids of one ms: random order)
    # Bulk cancel by workflow only walks queued, scheduled and running: the 6 first-claimed runs are left.
    result = await client.cancel_runs({"workflow": "rv-listed"}, dry_run=True)
    assert result["matched"] == 6
