"""Fencing tokens stay unique when the server forgets writes (restored from an older snapshot)."""

from __future__ import annotations

from redflow import RedflowClient, WorkflowHandlerContext, WorkflowRegistry, define_workflow
from redflow.storage.codes import Code
from redflow.storage.records import StepRecord, encode_step

from ..partitioned import store_of


async def _noop(ctx: WorkflowHandlerContext) -> None:
    return None


async def test_a_stale_worker_is_fenced_after_the_server_lost_its_claim(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    wf = define_workflow("forgotten", handler=_noop, registry=registry)
    redis = client.redis
    handle = await client.enqueue_definition(wf, None)
    store = store_of(client, handle.id)  # the run's partition: claims read its ready list
    k = store.keys
    await store.heartbeat("a", 60_000, 60_000, False)
    await store.heartbeat("b", 60_000, 60_000, False)
    # A snapshot of the partition as it is before worker a's claim.
    names = [k.runs, k.index, k.leases, k.seq, k.ready("default"), k.owned("a"), k.owned("b")]
    snapshot = {name: await redis.execute("DUMP", name) for name in names}
    _, _, runs_a = await store.claim("a", ["default"], 1, 10)
    token_a = runs_a[0].token
    # The server restarts from that snapshot: a's claim is forgotten, a does not know.
    for name, dumped in snapshot.items():
        await redis.execute("DEL", name)
        if dumped is not None:
            await redis.execute("RESTORE", name, 0, dumped)
    _, _, runs_b = await store.claim("b", ["default"], 1, 10)
    assert [r.id for r in runs_b] == [handle.id]
    assert runs_b[0].token != token_a
    line = encode_step(StepRecord(name="side-effect", position=1, attempt=1))
    assert await store.record_step(handle.id, token_a, line) is Code.STALE  # a's writes are refused
    assert await store.record_step(handle.id, runs_b[0].token, line) is Code.OK
