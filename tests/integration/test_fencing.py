"""Fencing and reaping at the storage level: exact transitions, driven step by step."""

from __future__ import annotations

from redflow import RedflowClient, WorkflowHandlerContext, WorkflowRegistry, define_workflow
from redflow.storage.codes import Code
from redflow.storage.records import StepRecord, encode_step

from ..partitioned import store_of


async def _noop(ctx: WorkflowHandlerContext) -> None:
    return None


async def test_stale_token_writes_are_rejected_after_reap(client: RedflowClient, registry: WorkflowRegistry) -> None:
    wf = define_workflow("fence", handler=_noop, registry=registry)
    handle = await client.enqueue_definition(wf, {"a": 1})
    store = store_of(client, handle.id)  # the scripts of the run's partition, its workers and leader
    # Worker "old" registers with a lease that is already over, claims, then lapses.
    await store.heartbeat("old", 60_000, 60_000, False)
    code, _, runs = await store.claim("old", ["default"], 10, 10)
    assert code is Code.OK and [r.id for r in runs] == [handle.id]
    old_token = runs[0].token
    line = encode_step(StepRecord(name="s", position=1, attempt=1))
    assert await store.record_step(handle.id, old_token, line) is Code.OK
    await store.redis.execute("ZADD", store.keys.workers, 0, "old")  # its lease lapsed

    beat = await store.heartbeat("leader", 60_000, 60_000, True)
    leader, lapsed = beat.leader, beat.lapsed_workers
    assert leader.startswith("leader:") and lapsed == 1
    code, taken, crashed, left = await store.reap(leader, "old", 3, 60_000, 100)
    assert (code, taken, crashed, left) == (Code.OK, 1, 0, 0)
    assert await store.redis.execute("ZSCORE", store.keys.workers, "old") is None

    code, _, runs = await store.claim("leader", ["default"], 10, 10)
    assert [r.id for r in runs] == [handle.id]
    assert runs[0].header.attempt == 1 and runs[0].header.lapses == 1  # same attempt, one lapse counted
    assert [s.name for s in runs[0].steps] == ["s"]  # the recorded step survives
    assert await store.record_step(handle.id, old_token, line) is Code.STALE
    assert (await store.finish(handle.id, old_token, "old", "succeeded", b"1", False, 1000, "default"))[0] is Code.STALE
    assert await store.retry(handle.id, old_token, "old", "default", 0, b"{}") is Code.STALE
    assert await store.release(handle.id, old_token, "old", "default", 1000) is Code.STALE
    state = await client.get_run(handle.id)
    assert state is not None and state["status"] == "running"
    assert await store.finish(handle.id, runs[0].token, "leader", "succeeded", b"2", False, 1000, "default") == (
        Code.OK, "succeeded"
    )
    state = await client.get_run(handle.id)
    assert state is not None and state["status"] == "succeeded" and state["output"] == 2


async def test_reap_requires_current_leader_and_lapsed_worker(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    store = client.store
    await store.ensure_ready()
    await store.heartbeat("alive", 60_000, 60_000, False)
    leader = (await store.heartbeat("boss", 60_000, 60_000, True)).leader
    assert (await store.reap(leader, "alive", 3, 1000, 10))[0] is Code.ALIVE
    assert (await store.reap("boss:999", "alive", 3, 1000, 10))[0] is Code.NOT_LEADER
    # a second candidate cannot take a held leadership
    seen = (await store.heartbeat("other", 60_000, 60_000, True)).leader
    assert seen == leader


async def test_third_lapse_fails_run_as_crashed_and_queues_its_hook(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    wf = define_workflow("lapses", handler=_noop, registry=registry)
    handle = await client.enqueue_definition(wf, None)
    store = store_of(client, handle.id)  # the scripts of the run's partition, its workers and leader
    leader = (await store.heartbeat("boss", 60_000, 60_000, True)).leader
    for lapse in range(1, 4):
        wid = f"w{lapse}"
        await store.heartbeat(wid, 60_000, 60_000, False)
        _, _, runs = await store.claim(wid, ["default"], 1, 10)
        assert [r.kind for r in runs] == ["run"] and runs[0].header.attempt == 1
        await store.redis.execute("ZADD", store.keys.workers, 0, wid)
        code, taken, crashed, _ = await store.reap(leader, wid, 3, 60_000, 10)
        assert (code, taken, crashed) == (Code.OK, 1, 1 if lapse == 3 else 0)
    state = await client.get_run(handle.id)
    assert state is not None and state["status"] == "failed" and state["error"]["kind"] == "crashed"
    _, _, runs = await store.claim("boss", ["default"], 1, 10)
    assert [r.kind for r in runs] == ["hook"]
    assert await store.hook_done(handle.id, runs[0].token, "boss") is Code.OK
    assert await store.redis.execute("HGET", store.keys.leases, handle.id) is None
    assert await store.redis.execute("SCARD", store.keys.owned("boss")) == 0


async def test_a_run_listed_twice_in_its_ready_list_is_claimed_once(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    # A claim takes its batch with one RPOP and one HMGET: a second copy of an id in that batch (or
    # a later one of the same call) reads a header from before the claim wrote its own.
    wf = define_workflow("twice", handler=_noop, registry=registry, max_concurrency=5)
    store = client.store
    first = await client.enqueue_definition(wf, 1)
    second = await client.enqueue_definition(wf, 2)
    ready = client.keys.ready("default")
    await client.redis.execute("LPUSH", ready, first.id, second.id, first.id)
    await store.heartbeat("w", 60_000, 60_000, False)
    code, _, runs = await store.claim("w", ["default"], 10, 10)
    assert code is Code.OK and sorted(r.id for r in runs) == sorted([first.id, second.id])
    assert await client.redis.execute("LLEN", ready) == 0
    running = await client.redis.execute("HGET", client.keys.running, "twice")
    assert running == b"2"  # the running count says two running runs, as the leases do
    assert await client.redis.execute("HLEN", client.keys.leases) == 2


async def test_max_concurrency_counts_the_runs_one_claim_starts(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    wf = define_workflow("capped", handler=_noop, registry=registry, max_concurrency=2)
    await client.sync_registry()  # what a starting worker records: the limit
    store = client.store
    handles = [await client.enqueue_definition(wf, n) for n in range(5)]
    await store.heartbeat("w", 60_000, 60_000, False)
    code, _, runs = await store.claim("w", ["default"], 10, 10)
    assert code is Code.OK and [r.id for r in runs] == [h.id for h in handles[:2]]
    assert await client.redis.execute("ZCARD", client.keys.held) == 3  # the rest wait outside the queue
