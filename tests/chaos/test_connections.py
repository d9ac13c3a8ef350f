"""Connection faults through a real TCP proxy (issue 10, item 3): deadlines, reconnects, readiness.

The frozen-connection test fails on f04b3d6: a half-open connection (peer silent, no RST) hung the
heartbeat and the claim loop forever while the worker kept reporting itself ready.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from redflow import RedflowClient, StartWorkerOptions, WorkflowHandlerContext, WorkflowRegistry, define_workflow
from redflow import start_worker as start_redflow_worker
from redflow._redis.client import ServerAddress

from ..conftest import wait_until
from .proxy import FaultProxy


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[FaultProxy]:
    address = ServerAddress.from_url(redis_url)
    p = await FaultProxy(address.host, address.port).start()
    yield p
    await p.close()


async def _echo(ctx: WorkflowHandlerContext) -> object:
    return ctx.input


async def test_a_frozen_connection_is_replaced_and_work_goes_on(
    client: RedflowClient, registry: WorkflowRegistry, prefix: str, proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REDFLOW_COMMAND_TIMEOUT_MS", "1500")
    wf = define_workflow("through-proxy", handler=_echo, registry=registry)
    worker = await start_redflow_worker(StartWorkerOptions(
        app="chaos", url=proxy.url, prefix=prefix, registry=registry, lease_ms=2000,
    ))
    try:
        assert await (await client.enqueue_definition(wf, 1)).result(timeout_ms=5000) == 1
        frozen = proxy.freeze()  # every open connection goes silent; the sockets stay open
        assert frozen >= 2
        handle = await client.enqueue_definition(wf, 2)  # enqueued directly, not through the proxy
        assert await handle.result(timeout_ms=15_000) == 2
        await wait_until(lambda: worker.ready, timeout_s=10, what="the worker ready again")
        assert proxy.accepted > frozen  # it reconnected
    finally:
        await asyncio.wait_for(worker.stop(grace_period_ms=0), 20)


async def test_readiness_turns_false_while_renewals_stall(
    client: RedflowClient, registry: WorkflowRegistry, prefix: str, proxy: FaultProxy,
) -> None:
    define_workflow("ready-check", handler=_echo, registry=registry)
    worker = await start_redflow_worker(StartWorkerOptions(
        app="chaos", url=proxy.url, prefix=prefix, registry=registry, lease_ms=1500,
    ))
    try:
        assert worker.ready
        proxy.refuse = True  # no new connection gets through ...
        proxy.cut()  # ... and the open ones are gone
        await wait_until(lambda: not worker.ready, timeout_s=10, what="readiness false")
        proxy.refuse = False
        await wait_until(lambda: worker.ready, timeout_s=15, what="readiness back")
    finally:
        await asyncio.wait_for(worker.stop(grace_period_ms=0), 20)
