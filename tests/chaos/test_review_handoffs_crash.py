"""A worker process SIGKILLed at the two crossings of a remote child: right after
start_child_elsewhere recorded the child (before its applier created it in p0), and right after the
child ended in p0 (before child_ended was applied in the parent's partition). Another process's
leaders must apply what the dead one left: every parent finishes, every outbox empties, and no
child is left live.

Worker processes are this module: ``python -m tests.chaos.test_review_handoffs_crash URL PREFIX MODE``
(MODE ``create``/``end``: SIGKILL itself at the first such hand-off it would apply; ``none``)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from redflow import (
    RedflowClient,
    StartWorkerOptions,
    WorkflowHandlerContext,
    WorkflowRegistry,
    create_client,
    define_workflow,
    start_worker,
)
from redflow.storage.handoffs import Outbox
from redflow.storage.keys import partition_of

from ..conftest import wait_until
from .worker_procs import WorkerProcs

pytestmark = pytest.mark.timeout(120)

P = 4
RH = WorkflowRegistry()


async def rhc_kid(ctx: WorkflowHandlerContext) -> Any:
    await asyncio.sleep(0.05)
    return ctx.input * 2


define_workflow("rhc-kid", handler=rhc_kid, registry=RH, max_concurrency=5)


async def rhc_parent(ctx: WorkflowHandlerContext) -> Any:
    return await ctx.step.run_workflow("kid", "rhc-kid", ctx.input)


define_workflow("rhc-parent", handler=rhc_parent, registry=RH, max_attempts=3)


async def _worker_main(url: str, prefix: str, mode: str) -> None:
    if mode in ("create", "end"):
        kind = b"n" if mode == "create" else b"c"
        real = Outbox._apply

        async def die_first(self: Outbox, member: bytes, retention_ms: int) -> list[str]:
            if member.startswith(kind):
                os.kill(os.getpid(), signal.SIGKILL)
            return await real(self, member, retention_ms)

        Outbox._apply = die_first  # type: ignore[method-assign]
    worker = await start_worker(StartWorkerOptions(
        app="rhc", url=url, prefix=prefix, registry=RH, concurrency=8, lease_ms=1200, grace_period_ms=1000,
        blmove_timeout_sec=1.0, watchdog_stalled_for_ms=1000,
    ))
    assert len(worker.group) == P
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await worker.stop()


async def _live_children(client: RedflowClient, parents: list[str]) -> list[str]:
    live = []
    for pid in parents:
        for child in await client.store.children_of(pid):
            h = await client.store.read_header(child)
            if h is not None and h.status not in ("succeeded", "failed", "canceled"):
                live.append(child)
    return live


@pytest.mark.parametrize("mode", ["create", "end"])
async def test_a_worker_killed_at_a_crossing_leaves_nothing_stuck(
    redis_url: str, prefix: str, tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REDFLOW_PARTITIONS", raising=False)
    client = create_client(url=redis_url, prefix=prefix, partitions=P)
    client.registry = RH
    procs = WorkerProcs("tests.chaos.test_review_handoffs_crash", redis_url, prefix, tmp_path)
    try:
        await client.store.ensure_ready()
        handles = []
        while len(handles) < 3:  # parents outside p0: their limited child crosses
            h = await client.enqueue_definition(RH.get("rhc-parent"), len(handles) + 1)  # type: ignore[arg-type]
            if partition_of(h.id) == "p0":
                await client.cancel_run(h.id)
            else:
                handles.append(h)
        victim = procs._popen((mode,))  # it may die before it says ready
        await asyncio.wait_for(asyncio.to_thread(victim.wait), 30)
        assert victim.returncode == -signal.SIGKILL, "the worker killed itself at the crossing"
        pending = sum([await Outbox(s).pending() for s in client.store.partitions])
        assert pending >= 1, "the dead worker left a hand-off"
        await procs.start("none")
        outs = await asyncio.gather(*(h.result(timeout_ms=30_000) for h in handles))
        assert outs == [2 * (n + 1) for n in range(3)]
        await wait_until(lambda: _all_empty(client), timeout_s=20, what="every outbox applied")
        ids = [h.id for h in handles]
        await wait_until(lambda: _no_live(client, ids), timeout_s=20, what="no child left live")
    finally:
        procs.close()
        await client.close()


async def _all_empty(client: RedflowClient) -> bool:
    return all([await Outbox(s).pending() == 0 for s in client.store.partitions])


async def _no_live(client: RedflowClient, ids: list[str]) -> bool:
    return not await _live_children(client, ids)


def _main(argv: list[str]) -> Any:
    return asyncio.run(_worker_main(*argv))


if __name__ == "__main__":
    _main(sys.argv[1:])
