"""Review: a worker process SIGSTOPped (then SIGCONTed) while it drains four partitions.

Worker processes are this module: ``python -m tests.chaos.test_review_partitions_stop URL PREFIX LOGDIR``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
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

pytestmark = pytest.mark.timeout(150)

P = 4
RUNS = 160
RS = WorkflowRegistry()
STEPS = ("a", "b", "c")
PAUSE = 0.03  # seconds a step takes


async def rs_steps(ctx: WorkflowHandlerContext) -> list[str]:
    out = [await ctx.step.run("a", logged_step, ctx, "a", PAUSE)]
    out.append(await ctx.step.run("b", logged_step, ctx, "b", PAUSE))
    out.append(await ctx.step.run("c", logged_step, ctx, "c", PAUSE))
    return out


define_workflow("rs-steps", handler=rs_steps, registry=RS)


async def _worker_main(url: str, prefix: str, logs: str) -> None:
    os.environ[step_log.ENV] = logs
    worker = await start_worker(StartWorkerOptions(
        app="rs", url=url, prefix=prefix, registry=RS, concurrency=8, lease_ms=1200, grace_period_ms=2000,
        blmove_timeout_sec=1.0, watchdog_stalled_for_ms=1000,
    ))
    assert len(worker.group) == P
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await worker.stop()


async def test_a_paused_worker_loses_its_runs_in_every_partition_and_repeats_nothing_after_resume(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    client = create_client(url=redis_url, prefix=prefix, partitions=P)
    client.registry = RS
    procs = WorkerProcs("tests.chaos.test_review_partitions_stop", redis_url, prefix, tmp_path)
    try:
        await client.store.ensure_ready()
        handles = await client.enqueue_many(RS.get("rs-steps"), list(range(RUNS)))  # type: ignore[arg-type]
        ids = [h.id for h in handles]
        victim = await procs.start(str(tmp_path))
        await wait_until(lambda: ended_at_least(client, ids, 16), timeout_s=60, what="16 runs ended")
        survivor = await procs.start(str(tmp_path))
        victim.send_signal(signal.SIGSTOP)
        stopped_at = time.time()
        await asyncio.sleep(0)
        await wait_until(lambda: ended_at_least(client, ids, RUNS // 2), timeout_s=60, what="half the runs ended")

        async def reaped() -> bool:  # the paused worker's runs in every partition were taken back
            hs = await client.store.read_headers(ids)
            return time.time() - stopped_at > 3 and not any(
                h is not None and h.status == "running" and h.owner and str(victim.pid) in h.owner for h in hs)

        await wait_until(reaped, timeout_s=30, what="the paused worker's runs taken back")
        victim.send_signal(signal.SIGCONT)
        cont_at = time.time()
        await wait_until(lambda: ended_at_least(client, ids, RUNS), timeout_s=90, what="every run ended")
        headers = await client.store.read_headers(ids)
        assert Counter(h.status for h in headers if h is not None) == {"succeeded": RUNS}
        outputs = await asyncio.gather(*(h.result(timeout_ms=5000) for h in handles))
        assert outputs == [[f"{n}:{s}" for s in STEPS] for n in range(RUNS)]
        stats = await client.get_stats()
        assert stats["by_status"]["succeeded"] == RUNS and stats["total"] == RUNS
        bad = []
        repeated = 0
        for (run_id, step), events in executions(tmp_path).items():
            starts = [(at, pid) for at, phase, pid in events if phase == "start"]
            if len(starts) > 1:
                repeated += 1
                # the earlier executions must be the paused process's, begun before the pause
                for at, pid in starts[:-1]:
                    if pid != victim.pid or at > stopped_at:
                        bad.append((run_id, partition_of(run_id), step, starts))
            for at, pid in starts:
                if pid == victim.pid and at > cont_at + 0.001:
                    # after resuming, the paused process may only start steps of runs it still holds,
                    # and then no other process may have started that step
                    if len(starts) > 1:
                        bad.append(("after-cont", run_id, step, starts))
        assert not bad, bad[:5]
        print(f"\n{repeated} repeated step(s); victim {victim.pid} survivor {survivor.pid}")
    finally:
        procs.close()
        await client.close()


def _main(argv: list[str]) -> Any:
    return asyncio.run(_worker_main(*argv))


if __name__ == "__main__":
    _main(sys.argv[1:])
