"""A batch of finishes on a connection that fails: the batch is one command, so its runs end all
together or not at all, every caller hears the failure, and finishing again (what a worker does once
the connection is back, with the same tokens) ends each run exactly once."""

from __future__ import annotations

import asyncio

import pytest

from redflow import RedflowClient, WorkflowHandlerContext, WorkflowRegistry, create_client, define_workflow
from redflow._redis.errors import RedisError
from redflow.storage.codes import Code

from ..conftest import wait_until
from .proxy import FaultProxy

LONG = 600_000
RUNS = 6


async def _noop(ctx: WorkflowHandlerContext) -> None:
    return None


@pytest.mark.parametrize("fault", ["request lost", "reply lost"])
async def test_a_batch_on_a_failing_connection_ends_its_runs_once(
    client: RedflowClient, registry: WorkflowRegistry, prefix: str, proxy: FaultProxy, fault: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REDFLOW_COMMAND_TIMEOUT_MS", "60000")  # the test cuts; no deadline does
    wf = define_workflow("fbf", handler=_noop, registry=registry)
    via = create_client(url=proxy.url, prefix=prefix)
    try:
        store = via.store
        await store.ensure_ready()
        await store.heartbeat("w", LONG, LONG, False)
        handles = [await client.enqueue_definition(wf, i) for i in range(RUNS)]
        code, _, runs = await store.claim("w", ["default"], RUNS, 10)
        assert code is Code.OK and len(runs) == RUNS
        if fault == "request lost":
            proxy.freeze()  # the batch never reaches the server
        else:
            proxy.drop_replies()  # the batch applies; its reply never comes back
        finishes = [asyncio.ensure_future(store.finish(r.id, r.token, "w", "succeeded", b"1", False, LONG,
                                                       "default")) for r in runs]

        async def statuses() -> set[str]:
            return {(await client.get_run(h.id) or {}).get("status", "") for h in handles}

        if fault == "reply lost":
            await wait_until(lambda: _all(statuses, "succeeded"), timeout_s=10, what="the batch applied")
        else:
            await asyncio.sleep(0.2)  # time for the batch to have left the client (it is held by the proxy)
            assert await statuses() == {"running"}
        proxy.cut()
        results = await asyncio.gather(*finishes, return_exceptions=True)
        assert all(isinstance(r, RedisError) for r in results), results  # every caller hears it

        again = await asyncio.gather(*(store.finish(r.id, r.token, "w", "succeeded", b"1", False, LONG, "default")
                                       for r in runs))
        expected = (Code.STALE, "") if fault == "reply lost" else (Code.OK, "succeeded")
        assert again == [expected] * RUNS
        assert await statuses() == {"succeeded"}
        index = client.keys.index
        assert await client.redis.execute("ZLEXCOUNT", index, "[s:succeeded:", "(s:succeeded;") == RUNS
        assert await client.redis.execute("HLEN", client.keys.running) == 0  # no workflow counts a running run
        assert await client.redis.execute("SCARD", client.keys.owned("w")) == 0
    finally:
        await via.close()


async def _all(read, value: str) -> bool:  # type: ignore[no-untyped-def]
    return await read() == {value}
