"""Connection faults through a real TCP proxy (issue 10, item 3): deadlines, reconnects, readiness.

The frozen-connection test fails on f04b3d6: a half-open connection (peer silent, no RST) hung the
heartbeat and the claim loop forever while the worker kept reporting itself ready. The last test
checks the same for a half-open *replacement* of the blocking connection.
"""

from __future__ import annotations

import asyncio

import pytest

from redflow import RedflowClient, StartWorkerOptions, WorkflowHandlerContext, WorkflowRegistry, define_workflow
from redflow import start_worker as start_redflow_worker

from ..conftest import wait_until
from .proxy import FaultProxy


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
        # Frozen while blocked in BRPOP: the bell of the next run is popped at the server and its reply
        # never arrives. The blocking wait (5 s) plus the watchdog (15 s) would end only after 20 s.
        await wait_until(lambda: _blocked_client_ids(client), timeout_s=10, what="the worker in BRPOP")
        frozen = proxy.freeze()  # every open connection goes silent; the sockets stay open
        assert frozen >= 2
        handle = await client.enqueue_definition(wf, 2)  # enqueued directly, not through the proxy
        assert await handle.result(timeout_ms=12_000) == 2
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


CLIENT_ID = b"*2\r\n$6\r\nCLIENT\r\n$2\r\nID\r\n"  # the first command of a worker's blocking connection


async def test_half_open_connections_and_black_holed_reconnects_are_abandoned(
    client: RedflowClient, registry: WorkflowRegistry, prefix: str, proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every open connection goes silent and stays open, and so does every new one for a while: the
    command deadline abandons each, readiness turns false, and the worker works again once a new
    connection gets an answer. (The blocking connection's reconnects are spared: see the next test.)"""
    monkeypatch.setenv("REDFLOW_COMMAND_TIMEOUT_MS", "1000")
    wf = define_workflow("half-open", handler=_echo, registry=registry)
    worker = await start_redflow_worker(StartWorkerOptions(
        app="chaos", url=proxy.url, prefix=prefix, registry=registry, lease_ms=1500, blmove_timeout_sec=1.0,
        watchdog_stalled_for_ms=1000,
    ))
    try:
        assert await (await client.enqueue_definition(wf, 1)).result(timeout_ms=5000) == 1
        proxy.spare = lambda first: first.startswith(CLIENT_ID)
        proxy.blackhole = True
        frozen = proxy.half_open()  # open connections frozen for good; new ones accepted, never answered
        assert frozen >= 2
        await wait_until(lambda: not worker.ready, timeout_s=10, what="readiness false")
        await wait_until(lambda: len(proxy.blackholed) >= 2, timeout_s=10, what="reconnects into the black hole")
        proxy.blackhole = False
        handle = await client.enqueue_definition(wf, 2)  # enqueued directly, not through the proxy
        assert await handle.result(timeout_ms=15_000) == 2
        await wait_until(lambda: worker.ready, timeout_s=10, what="the worker ready again")
        assert len(proxy.detached) == frozen  # nothing closed them: the worker gave up on them itself
    finally:
        await asyncio.wait_for(worker.stop(grace_period_ms=0), 20)


async def _blocked_client_ids(client: RedflowClient) -> list[str]:
    """Ids of the connections blocked in BRPOP now (``cmd`` names only the last command; ``flags=b``
    says the client is blocked)."""
    listing = (await client.redis.execute("CLIENT", "LIST")).decode()
    blocked = []
    for line in listing.splitlines():
        fields = dict(field.split("=", 1) for field in line.split() if "=" in field)
        if fields.get("cmd") == "brpop" and "b" in fields.get("flags", ""):
            blocked.append(fields["id"])
    return blocked


async def test_a_half_open_replacement_of_the_blocking_connection_is_abandoned(
    client: RedflowClient, registry: WorkflowRegistry, prefix: str, proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The blocking connection drops while the shared one stays healthy, and its replacement is
    accepted and never answered: the claim loop must give up on it (deadline) and claim again. It
    hangs instead, claiming nothing, while the heartbeat keeps the worker ready."""
    monkeypatch.setenv("REDFLOW_COMMAND_TIMEOUT_MS", "1000")
    wf = define_workflow("half-open-blocking", handler=_echo, registry=registry)
    worker = await start_redflow_worker(StartWorkerOptions(
        app="chaos", url=proxy.url, prefix=prefix, registry=registry, lease_ms=1500, blmove_timeout_sec=1.0,
        watchdog_stalled_for_ms=1000,
    ))
    try:
        assert await (await client.enqueue_definition(wf, 1)).result(timeout_ms=5000) == 1
        blocked = await wait_until(lambda: _blocked_client_ids(client), timeout_s=10, what="the worker in BRPOP")
        proxy.blackhole = True  # new connections only: the shared one keeps working
        for client_id in blocked:
            await client.redis.execute("CLIENT", "KILL", "ID", client_id)
        await wait_until(lambda: proxy.blackholed, timeout_s=10, what="the blocking connection reopened")
        proxy.blackhole = False
        handle = await client.enqueue_definition(wf, 2)
        assert await handle.result(timeout_ms=5_000) == 2
        assert worker.ready
    finally:
        await asyncio.wait_for(worker.stop(grace_period_ms=0), 20)
