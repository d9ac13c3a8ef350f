"""Workers killed with SIGKILL mid-run: nothing lost, no recorded step twice, every run ends once."""

from __future__ import annotations

import asyncio
import signal

import pytest

from redflow import RedflowClient

from ..conftest import wait_until
from .apps import registry as app_registry
from .conftest import Spawn, counter


@pytest.fixture
def apps_client(client: RedflowClient) -> RedflowClient:
    client.registry = app_registry
    return client


async def test_sigkill_after_first_step_second_worker_completes_without_rerunning_it(
    apps_client: RedflowClient, spawn_worker: Spawn
) -> None:
    client = apps_client
    first = spawn_worker()
    handle = await client.run_by_name("kill-after-first-step", {})
    await wait_until(lambda: first.poll() is not None, timeout_s=20, what="worker killed by its handler")
    assert first.returncode == -signal.SIGKILL
    assert await counter(client, f"first:{handle.id}") == 1
    second = spawn_worker()
    result = await handle.result(timeout_ms=30_000)
    assert result["pid"] == second.pid
    assert await counter(client, f"first:{handle.id}") == 1, "recorded step ran again"
    assert await counter(client, f"second:{handle.id}") == 1
    state = await client.get_run(handle.id)
    assert state is not None and state["status"] == "succeeded" and state["attempt"] == 1


async def test_handler_that_kills_its_worker_three_times_ends_crashed(
    apps_client: RedflowClient, spawn_worker: Spawn
) -> None:
    client = apps_client
    handle = await client.run_by_name("kill-always", {})
    for _ in range(3):
        proc = spawn_worker()
        await wait_until(lambda p=proc: p.poll() is not None, timeout_s=30, what="worker killed")
    spawn_worker()  # a healthy worker: leads, reaps the third lapse and runs on_failure
    state = await wait_until(
        lambda: _terminal(client, handle.id), timeout_s=30, what="run failed as crashed"
    )
    assert state["status"] == "failed"
    assert state["error"]["kind"] == "crashed"
    assert await counter(client, f"kill-always:{handle.id}") == 3
    await wait_until(lambda: counter(client, f"on-failure:{handle.id}"), timeout_s=20, what="on_failure")
    await asyncio.sleep(0.5)  # a duplicate hook call would land within this window
    assert await counter(client, f"on-failure:{handle.id}") == 1


async def _terminal(client: RedflowClient, run_id: str):
    state = await client.get_run(run_id)
    return state if state and state["status"] in ("succeeded", "failed", "canceled") else None


@pytest.mark.timeout(120)
async def test_thousand_runs_drained_by_two_worker_processes_exactly_once(
    apps_client: RedflowClient, spawn_worker: Spawn
) -> None:
    client = apps_client
    handles = [await client.run_by_name("record-pid", {}) for _ in range(1000)]
    a, b = spawn_worker(concurrency=50), spawn_worker(concurrency=50)
    results = await asyncio.gather(*(h.result(timeout_ms=90_000) for h in handles))
    pids = {r["pid"] for r in results}
    assert pids <= {a.pid, b.pid}
    for h in handles:
        assert await counter(client, f"body:{h.id}") == 1
    states = await asyncio.gather(*(client.get_run(h.id) for h in handles))
    assert all(s is not None and s["status"] == "succeeded" and s["attempt"] == 1 for s in states)
    a.send_signal(signal.SIGTERM)
    b.send_signal(signal.SIGTERM)
    assert a.wait(timeout=20) == 0 and b.wait(timeout=20) == 0


async def test_mutex_is_released_when_its_holder_worker_is_sigkilled(
    apps_client: RedflowClient, spawn_worker: Spawn
) -> None:
    client = apps_client
    first = spawn_worker()
    holder = await client.run_by_name("mutex-job", {"n": "holder", "die": True})
    await wait_until(lambda: first.poll() is not None, timeout_s=20, what="holder's worker killed")
    waiter = await client.run_by_name("mutex-job", {"n": "waiter"})
    spawn_worker()
    assert await holder.result(timeout_ms=30_000) == "holder"
    assert await waiter.result(timeout_ms=30_000) == "waiter"
    assert await counter(client, f"mutex-done:{holder.id}") == 1
    assert await counter(client, f"mutex-done:{waiter.id}") == 1
    assert await client.redis.execute("HLEN", client.keys.mutexes) == 0
