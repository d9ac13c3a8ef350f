"""A worker that stalls past its lease (SIGSTOP) loses its runs; its late writes are rejected."""

from __future__ import annotations

import signal

from redflow import RedflowClient

from ..conftest import wait_until
from .apps import registry as app_registry
from .conftest import Spawn, counter


async def test_stalled_worker_late_write_is_rejected(client: RedflowClient, spawn_worker: Spawn) -> None:
    client.registry = app_registry
    stalled = spawn_worker(lease_ms=1000)
    handle = await client.run_by_name("slow-step", {"sleep": 1.5})
    started = f"{client.prefix}:test:slow-started:{handle.id}:{stalled.pid}"
    await wait_until(lambda: client.redis.execute("EXISTS", started), timeout_s=20, what="step started")
    stalled.send_signal(signal.SIGSTOP)
    try:
        rescuer = spawn_worker(lease_ms=1000)
        result = await handle.result(timeout_ms=30_000)
        assert result == {"step_pid": rescuer.pid, "pid": rescuer.pid}
    finally:
        stalled.send_signal(signal.SIGCONT)
    # The stalled worker wakes up; whatever it still tries to write for the run is refused. Stopping
    # it gracefully flushes every write it would ever make.
    stalled.send_signal(signal.SIGTERM)
    await wait_until(lambda: stalled.poll() is not None, timeout_s=20, what="stalled worker exit")
    assert stalled.returncode == 0
    steps = await client.get_run_steps(handle.id)
    assert [(s["name"], s["output"]) for s in steps] == [("slow", rescuer.pid)]
    state = await client.get_run(handle.id)
    assert state is not None and state["status"] == "succeeded"
    assert state["output"] == {"step_pid": rescuer.pid, "pid": rescuer.pid}
    assert await counter(client, f"slow-body:{handle.id}") == 2  # the unrecorded step ran again, once

