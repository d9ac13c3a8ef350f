"""Server outages and unsafe server settings, each on a server of the test's own."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator

import pytest

from redflow import (
    StartWorkerOptions,
    WorkflowHandlerContext,
    WorkflowRegistry,
    create_client,
    define_workflow,
    start_worker,
)
from redflow.embedded import EmbeddedServer

from ..conftest import wait_until


@pytest.fixture
def own_server(tmp_path) -> Iterator[EmbeddedServer]:
    if os.environ.get("REDFLOW_TEST_REDIS_URL"):
        pytest.skip("needs a server binary to start and kill")
    server = EmbeddedServer(os.environ.get("REDFLOW_TEST_REDIS_SERVER") or None, data_dir=tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.mark.timeout(60)
async def test_worker_cancels_runs_when_it_cannot_renew_then_reconnects(own_server: EmbeddedServer) -> None:
    reg = WorkflowRegistry()
    signals: list[asyncio.Event] = []

    async def waits(ctx: WorkflowHandlerContext) -> str:
        signals.append(ctx.signal)
        if ctx.input == "block" and len(signals) == 1:
            await asyncio.Event().wait()
        return "ok"

    wf = define_workflow("outage", handler=waits, registry=reg)
    client = create_client(url=own_server.url, prefix="out")
    client.registry = reg
    worker = await start_worker(
        StartWorkerOptions(app="t", url=own_server.url, prefix="out", registry=reg, lease_ms=1500)
    )
    try:
        await client.enqueue_definition(wf, "block")
        await wait_until(lambda: signals, what="run started")
        loop = asyncio.get_running_loop()
        own_server.kill()
        killed_at = loop.time()
        await wait_until(lambda: signals[0].is_set(), timeout_s=10, what="local cancel")
        assert loop.time() - killed_at < 1.5, "runs must be canceled before the 1.5 s lease lapses"
        own_server.start()  # same port, same data directory (AOF)
        handle = await wait_until(lambda: _try_enqueue(client, wf), timeout_s=20, what="server back")
        assert await handle.result(timeout_ms=20_000) == "ok"
    finally:
        await worker.stop(grace_period_ms=0)
        await client.close()


async def _try_enqueue(client, wf):  # type: ignore[no-untyped-def]
    from redflow._redis.errors import RedisError

    try:
        return await client.enqueue_definition(wf, "quick")
    except RedisError:
        return None


async def test_evicting_server_gets_a_loud_warning(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    if os.environ.get("REDFLOW_TEST_REDIS_URL"):
        pytest.skip("needs a server binary to start")
    server = EmbeddedServer(
        os.environ.get("REDFLOW_TEST_REDIS_SERVER") or None, data_dir=tmp_path, appendonly=False,
        extra_args=["--maxmemory-policy", "allkeys-lru"],
    ).start()
    try:
        with caplog.at_level(logging.WARNING, logger="redflow.worker"):
            worker = await start_worker(
                StartWorkerOptions(app="t", url=server.url, prefix="ev", registry=WorkflowRegistry(), queues=["q"])
            )
            await worker.stop()
        assert any("maxmemory-policy is 'allkeys-lru'" in r.getMessage() for r in caplog.records)
    finally:
        server.stop()
