"""Run streams: live reads, resumed from a cursor, and whole-stream reads."""

from __future__ import annotations

import asyncio

from redflow import RedflowClient, WorkflowHandlerContext, WorkflowRegistry, define_workflow

from ..partitioned import keys_of


async def test_stream_read_live_and_resumed_from_its_cursor(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    go = asyncio.Event()

    async def handler(ctx: WorkflowHandlerContext) -> str:
        assert ctx.stream is not None
        for i in range(3):
            await ctx.stream.write({"token": i})
        await go.wait()
        for i in range(3, 6):
            await ctx.stream.write({"token": i})
        return "done"

    wf = define_workflow("streamer", handler=handler, stream=True, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    reader = await client.read_stream(handle.id, block_ms=200)
    assert reader is not None
    seen = []
    async for chunk in reader:
        seen.append(chunk)
        if len(seen) == 3:
            break
    assert [c.record["value"]["token"] for c in seen] == [0, 1, 2]
    assert all(c.record["attempt"] == 1 for c in seen)
    go.set()
    resumed = await client.read_stream(handle.id, resumable=seen[-1].cursor_id, block_ms=200)
    assert resumed is not None
    rest = [c.record["value"]["token"] async for c in resumed]  # ends when the run ends
    assert rest == [3, 4, 5]
    assert await handle.result(timeout_ms=5000) == "done"
    whole = await client.get_run_stream(handle.id)
    assert [r["value"]["token"] for r in whole] == list(range(6))
    assert [r["value"]["token"] for r in await client.get_run_stream(handle.id, limit=2)] == [0, 1]
    ttl = await client.redis.execute("PTTL", keys_of(client, handle.id).stream(handle.id))
    assert 0 < ttl <= client.retention_ms  # the stream expires with the retention window
    drained = await client.read_stream(handle.id, drain=True)
    assert drained is not None and len([c async for c in drained]) == 6
    assert await client.read_stream("no-such-run-p0") is None
