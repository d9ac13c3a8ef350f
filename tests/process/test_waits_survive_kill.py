"""A worker SIGKILLed while runs sleep, wait for events and wait for children: all complete once."""

from __future__ import annotations

import asyncio
import signal

from redflow import RedflowClient

from ..conftest import wait_until
from .apps import registry as app_registry
from .conftest import Spawn, counter


async def test_waiting_runs_complete_exactly_once_after_sigkill(client: RedflowClient, spawn_worker: Spawn) -> None:
    client.registry = app_registry
    first = spawn_worker(concurrency=20)
    sleepers = [await client.run_by_name("durable-sleeper", None) for _ in range(5)]
    waiters = [await client.run_by_name("event-waiter", {"key": f"k{i}"}) for i in range(5)]
    parents = [await client.run_by_name("parent-of-sleeper", None) for _ in range(5)]
    everyone = sleepers + waiters + parents

    async def all_waiting() -> bool:
        states = [await client.get_run(h.id) for h in everyone]
        return all(s is not None and s["status"] == "scheduled" for s in states)

    await wait_until(all_waiting, timeout_s=20, what="every run waiting")
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=10) == -signal.SIGKILL
    spawn_worker(concurrency=20)
    for i in range(5):
        await client.emit_event("proc.callback", {"n": i}, correlation_key=f"k{i}")
    results = await asyncio.gather(*(h.result(timeout_ms=30_000) for h in everyone))
    assert results == ["slept"] * 5 + [{"n": i} for i in range(5)] + ["parent:child-done"] * 5
    for h in sleepers:
        assert await counter(client, f"sleeper-before:{h.id}") == 1
        assert await counter(client, f"sleeper-after:{h.id}") == 1
    for h in waiters:
        assert await counter(client, f"waiter-after:{h.id}") == 1
    for h in parents:
        assert await counter(client, f"parent-after:{h.id}") == 1
        assert len(await client.store.children_of(h.id)) == 1  # replays never started a second child
