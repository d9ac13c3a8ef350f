"""A lease renewal counts from when it was asked for, not from when its reply was read: a worker
whose process stalls between the server's renewal and the reading of its reply (a pause, a starved
loop) must treat its lease as that old, or it would start steps and arm its lease guard on a lease
the server let lapse meanwhile, which another worker may have taken over (a chaos run found a step
started twice this way)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from redflow import WorkflowRegistry

LEASE_MS = 1500


async def test_a_renewal_read_after_a_stall_is_dated_from_its_request(
    registry: WorkflowRegistry, make_worker: Any
) -> None:
    worker = await make_worker(lease_ms=LEASE_MS)
    target = worker.group[0]
    original = target.store.heartbeat
    asked: list[float] = []

    async def stalled_heartbeat(*args: Any, **kwargs: Any) -> Any:
        asked.append(asyncio.get_running_loop().time())
        beat = await original(*args, **kwargs)
        time.sleep(LEASE_MS * 0.8 / 1000)  # noqa: ASYNC251 -- the process stalls with the reply in hand
        return beat

    target.store.heartbeat = stalled_heartbeat  # type: ignore[method-assign]
    try:
        await target._heartbeat_once()
    finally:
        target.store.heartbeat = original  # type: ignore[method-assign]
    assert target._last_renewal <= asked[0] + 0.05  # dated from the request (the write goes a tick later)
    assert target._lease_running_out()  # so nothing new starts on it until the next renewal
