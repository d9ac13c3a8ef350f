"""Worker processes SIGKILLed while they drain a prefix of four partitions: each partition's leader
takes back the dead worker's runs in that partition, nothing is lost, every run ends once with its
output, and no step whose execution a surviving process finished runs again.

Worker processes are this module: ``python -m tests.chaos.test_partitions_crash URL PREFIX LOGDIR``.
Their step bodies log each execution (``step_log``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from redflow import (
    StartWorkerOptions,
    WorkflowHandlerContext,
    WorkflowRegistry,
    create_client,
    define_workflow,
    start_worker,
)
from redflow.storage.keys import partition_of

from ..conftest import wait_until
from . import step_log
from .step_log import ended_at_least, executions, logged_step
from .worker_procs import WorkerProcs

pytestmark = pytest.mark.timeout(180)

P = 4
RUNS = 240
PC = WorkflowRegistry()
STEPS = ("a", "b", "c")
PAUSE = 0.015  # seconds a step takes


async def pc_steps(ctx: WorkflowHandlerContext) -> list[str]:
    out = [await ctx.step.run("a", logged_step, ctx, "a", PAUSE)]
    await ctx.step.wait_for("nap", "20ms")
    out.append(await ctx.step.run("b", logged_step, ctx, "b", PAUSE))
    out.append(await ctx.step.run("c", logged_step, ctx, "c", PAUSE))
    return out


define_workflow("pc-steps", handler=pc_steps, registry=PC)


async def _worker_main(url: str, prefix: str, logs: str) -> None:
    os.environ[step_log.ENV] = logs
    worker = await start_worker(StartWorkerOptions(
        app="pc", url=url, prefix=prefix, registry=PC, concurrency=12, lease_ms=1200, grace_period_ms=2000,
        blmove_timeout_sec=1.0, watchdog_stalled_for_ms=1000,
    ))
    assert len(worker.group) == P, "the worker adopts the prefix's partition count"
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await worker.stop()


async def test_killed_workers_lose_nothing_in_any_partition(redis_url: str, prefix: str, tmp_path: Path) -> None:
    client = create_client(url=redis_url, prefix=prefix, partitions=P)
    client.registry = PC
    procs = WorkerProcs("tests.chaos.test_partitions_crash", redis_url, prefix, tmp_path)
    try:
        await client.store.ensure_ready()
        handles = await client.enqueue_many(PC.get("pc-steps"), list(range(RUNS)))  # type: ignore[arg-type]
        ids = [h.id for h in handles]
        assert Counter(partition_of(i) for i in ids) == {f"p{i}": RUNS // P for i in range(P)}
        first = await procs.start(str(tmp_path))
        second = await procs.start(str(tmp_path))
        killed: list[int] = []
        for victim, after in ((first, RUNS // 5), (second, RUNS // 2)):
            await wait_until(lambda n=after: ended_at_least(client, ids, n), timeout_s=60,
                             what=f"{after} runs ended")
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            killed.append(victim.pid)
            await procs.start(str(tmp_path))
        await wait_until(lambda: ended_at_least(client, ids, RUNS), timeout_s=90, what="every run ended")

        headers = await client.store.read_headers(ids)
        outputs = await asyncio.gather(*(h.result(timeout_ms=5000) for h in handles))
        assert [h.status for h in headers if h is not None] == ["succeeded"] * RUNS
        assert outputs == [[f"{n}:{s}" for s in STEPS] for n in range(RUNS)]
        stats = await client.get_stats()
        assert stats["by_status"]["succeeded"] == RUNS and stats["total"] == RUNS

        repeated = 0
        for (run_id, step), events in executions(tmp_path).items():
            starts = [pid for _, phase, pid in events if phase == "start"]
            if len(starts) > 1:
                repeated += 1
                # Only an execution of a killed process can be repeated: its record may not have been written.
                assert all(pid in killed for pid in starts[:-1]), (run_id, step, starts, killed)
        assert repeated <= 2 * 12, f"{repeated} repeated executions for two kills of 12 slots each"
        print(f"\n{RUNS} runs over {P} partitions, 2 workers killed, {repeated} step(s) repeated")
    finally:
        procs.close()
        await client.close()


def _main(argv: list[str]) -> Any:
    return asyncio.run(_worker_main(*argv))


if __name__ == "__main__":
    _main(sys.argv[1:])
