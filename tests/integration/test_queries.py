"""Queries over the run index, stats, workflow metadata and retention."""

from __future__ import annotations

import asyncio

from redflow import (
    ListRunsParams,
    RedflowClient,
    SearchRunsParams,
    WorkflowHandlerContext,
    WorkflowRegistry,
    define_workflow,
)
from redflow.ids import run_id_time_ms


async def _echo(ctx: WorkflowHandlerContext) -> object:
    if ctx.input.get("fail"):
        raise RuntimeError(f"broken {ctx.input['n']}")
    return ctx.input


async def test_list_and_search_runs(client: RedflowClient, registry: WorkflowRegistry, make_worker) -> None:
    a = define_workflow("q-alpha", handler=_echo, max_attempts=1, registry=registry)
    b = define_workflow("q-beta", handler=_echo, queue="q2", registry=registry)
    await make_worker(queues=["default", "q2"])
    alpha = []
    for n in range(6):
        alpha.append(await client.enqueue_definition(a, {"n": n, "fail": n % 3 == 0, "tag": f"needle-{n}"}))
        await asyncio.sleep(0.002)
    beta = [await client.enqueue_definition(b, {"n": n}) for n in range(3)]
    for h in alpha + beta:
        try:
            await h.result(timeout_ms=10_000)
        except Exception:
            pass

    everything = await client.list_runs()
    assert [r["id"] for r in everything] == sorted((h.id for h in alpha + beta), reverse=True)
    failed = await client.list_runs(ListRunsParams(status="failed"))
    assert sorted(r["id"] for r in failed) == sorted([alpha[0].id, alpha[3].id])
    assert failed[0]["error"]["message"].startswith("broken")
    page1 = await client.list_runs(ListRunsParams(workflow="q-alpha", limit=4))
    page2 = await client.list_runs(ListRunsParams(workflow="q-alpha", limit=4, cursor=page1[-1]["cursor"]))
    assert [r["id"] for r in page1 + page2] == [h.id for h in reversed(alpha)]
    oldest = await client.list_runs(ListRunsParams(workflow="q-alpha", status="succeeded", sort="asc"))
    assert [r["id"] for r in oldest] == [alpha[i].id for i in (1, 2, 4, 5)]

    found = await client.search_runs(SearchRunsParams(query="needle-4"))
    assert [r["id"] for r in found["runs"]] == [alpha[4].id] and found["scanned"] == 9
    by_queue = await client.search_runs(SearchRunsParams(queue="q2"))
    assert sorted(r["id"] for r in by_queue["runs"]) == sorted(h.id for h in beta)
    start = run_id_time_ms(alpha[2].id)
    window = await client.search_runs(
        SearchRunsParams(
            workflow="q-alpha", created_after=start, created_before=run_id_time_ms(alpha[4].id), sort="asc"
        )
    )
    assert [r["id"] for r in window["runs"]][:1] == [alpha[2].id]
    assert alpha[4].id not in [r["id"] for r in window["runs"]]


async def test_search_by_parent_stats_and_meta(client: RedflowClient, registry: WorkflowRegistry, make_worker) -> None:
    async def child(ctx: WorkflowHandlerContext) -> int:
        return 1

    async def parent(ctx: WorkflowHandlerContext) -> int:
        await ctx.step.emit_workflow("one", "q-child", None)
        return await ctx.step.run_workflow("two", "q-child", None)

    define_workflow("q-child", handler=child, registry=registry)
    wf = define_workflow("q-parent", handler=parent, registry=registry)
    await make_worker(concurrency=4)
    handle = await client.enqueue_definition(wf, None)
    await handle.result(timeout_ms=10_000)
    kids = await client.search_runs(SearchRunsParams(parent_run_id=handle.id))
    assert len(kids["runs"]) == 2 and {r["workflow"] for r in kids["runs"]} == {"q-child"}
    stats = await client.get_stats()
    assert stats["by_status"]["succeeded"] >= 3 and stats["total"] >= 3
    assert stats["backlog"]["default"] == {"ready": 0, "scheduled": 0}
    assert "q-parent" in await client.list_workflows()
    meta = await client.get_workflow_meta("q-parent")
    assert meta is not None and meta["queue"] == "default" and meta["max_attempts"] == 3
    assert any(m["name"] == "q-child" for m in await client.list_workflows_meta())


async def test_retention_cleanup_removes_every_trace(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    wf = define_workflow("q-expire", handler=_echo, registry=registry)
    await make_worker()
    handles = [await client.enqueue_definition(wf, {"n": n}) for n in range(20)]
    await asyncio.gather(*(h.result(timeout_ms=10_000) for h in handles))
    await client.emit_event("q.evt", {"x": 1}, event_id="q-evt-1")
    far_future = 2**45
    assert await client.cleanup_expired_runs_now(reference_time_ms=far_future, limit=5) == 5
    assert await client.cleanup_expired_runs_now(reference_time_ms=far_future) >= 15
    assert await client.cleanup_expired_events_now(reference_time_ms=far_future) >= 1
    assert await client.get_run(handles[0].id) is None
    assert await client.get_event("q-evt-1") is None
    assert await client.list_runs(ListRunsParams(workflow="q-expire")) == []
    for key in (client.keys.runs, client.keys.inputs, client.keys.results, client.keys.steps, client.keys.expiry):
        assert await client.redis.execute("HLEN" if key != client.keys.expiry else "ZCARD", key) == 0
    assert await client.redis.execute("ZCARD", client.keys.index) == 0
    assert (await client.reset_runs())["deleted"] >= 0
    assert await client.get_workflow_meta("q-expire") is not None  # reset_runs keeps registrations
    await client.reset_state()
    assert await client.redis.execute("KEYS", f"{client.prefix}:*") == []
