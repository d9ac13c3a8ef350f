"""Worker processes (one SIGKILLed mid-drain) drain a prefix whose ready list holds damaged runs
mixed with plain, max_concurrency, mutex and throttled runs, and a damaged due run: every good run
ends once, the damaged ones stay put back (each listed once), and the running counts, held set and
mutex holders are empty at the end; the capped and mutex runs never overlapped.

Worker processes are this module: ``python -m tests.chaos.test_review_claim_poison URL PREFIX LOGDIR``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from redflow import (
    StartWorkerOptions,
    WorkflowHandlerContext,
    WorkflowRateLimitOptions,
    WorkflowRegistry,
    create_client,
    define_workflow,
    start_worker,
)

from ..conftest import wait_until
from . import step_log
from .step_log import ended_at_least, executions, logged_step
from .worker_procs import WorkerProcs

pytestmark = pytest.mark.timeout(180)

REG = WorkflowRegistry()
DAMAGED = b"\xc1"
PER = 40  # runs of each workflow


async def _body(ctx: WorkflowHandlerContext) -> str:
    return await ctx.step.run("s", logged_step, ctx, "s", 0.02)


define_workflow("cp-plain", handler=_body, registry=REG)
define_workflow("cp-capped", handler=_body, registry=REG, max_concurrency=2)
define_workflow("cp-mutex", handler=_body, registry=REG, mutex=lambda i: f"m{i % 2}")
define_workflow("cp-throttled", handler=_body, registry=REG,
                throttle=WorkflowRateLimitOptions(key=lambda i: "t", limit=1000, period="1m"))
NAMES = ("cp-plain", "cp-capped", "cp-mutex", "cp-throttled")


async def _worker_main(url: str, prefix: str, logs: str) -> None:
    os.environ[step_log.ENV] = logs
    worker = await start_worker(StartWorkerOptions(
        app="cp", url=url, prefix=prefix, registry=REG, concurrency=6, lease_ms=1200, grace_period_ms=2000,
        blmove_timeout_sec=1.0, watchdog_stalled_for_ms=1000,
    ))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await worker.stop()


def _overlaps(spans: list[tuple[float, float]]) -> int:
    """The most spans open at once."""
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    most = now = 0
    for _, d in events:
        now += d
        most = max(most, now)
    return most


async def test_poison_runs_among_limited_runs_under_killed_workers(redis_url: str, prefix: str, tmp_path: Path) -> None:
    client = create_client(url=redis_url, prefix=prefix, partitions=1)
    client.registry = REG
    procs = WorkerProcs("tests.chaos.test_review_claim_poison", redis_url, prefix, tmp_path)
    try:
        await client.store.ensure_ready()
        await client.sync_registry()
        k = client.store.keys
        handles, inputs = [], {}
        for n in range(PER):
            for name in NAMES:
                h = await client.run_by_name(name, n)
                handles.append(h)
                inputs[h.id] = (name, n)
        poison = [h.id for h in handles[5::37]]
        for rid in poison:
            await client.redis.execute("HSET", k.runs, rid, DAMAGED)
        due = await client.run_by_name("cp-plain", -1, run_at=datetime.now(UTC) + timedelta(milliseconds=200))
        await client.redis.execute("HSET", k.runs, due.id, DAMAGED)
        good = [h for h in handles if h.id not in poison]
        ids = [h.id for h in good]

        first = await procs.start(str(tmp_path))
        await procs.start(str(tmp_path))
        await procs.start(str(tmp_path))
        await wait_until(lambda: ended_at_least(client, ids, len(ids) // 4), timeout_s=60, what="a quarter ended")
        first.send_signal(signal.SIGKILL)
        first.wait()
        await procs.start(str(tmp_path))
        await wait_until(lambda: ended_at_least(client, ids, len(ids)), timeout_s=90, what="every good run ended")

        headers = await client.store.read_headers(ids)
        assert Counter(h.status for h in headers if h is not None) == {"succeeded": len(ids)}
        for h in good:
            assert await h.result(timeout_ms=5000) == f"{inputs[h.id][1]}:s"

        spans: dict[str, list[tuple[float, float]]] = {}
        for (run_id, _), events in executions(tmp_path).items():
            starts = [(at, pid) for at, phase, pid in events if phase == "start"]
            ends = [at for at, phase, _ in events if phase == "end"]
            assert run_id in inputs, run_id
            assert len(ends) >= 1, (run_id, events)
            live = [pid for _, pid in starts if pid != first.pid]
            assert len(live) <= 1, (run_id, events)  # run twice only by the killed process
            name, n = inputs[run_id]
            group = name if name != "cp-mutex" else f"{name}:{n % 2}"
            spans.setdefault(group, []).append((starts[-1][0], ends[-1]))
        assert _overlaps(spans["cp-capped"]) <= 2
        assert _overlaps(spans["cp-mutex:0"]) == 1 and _overlaps(spans["cp-mutex:1"]) == 1

        ready = [x.decode() for x in await client.redis.execute("LRANGE", k.ready("default"), 0, -1)]
        assert sorted(ready) == sorted(poison)  # put back, each once
        assert await client.redis.execute("ZSCORE", k.scheduled("default"), due.id) is not None
        assert await client.redis.execute("HLEN", k.running) == 0
        assert await client.redis.execute("HLEN", k.mutexes) == 0
        assert await client.redis.execute("ZCARD", k.held) == 0
        assert await client.redis.execute("HLEN", k.leases) == 0
    finally:
        procs.close()
        await client.close()


def _main(argv: list[str]) -> Any:
    return asyncio.run(_worker_main(*argv))


if __name__ == "__main__":
    _main(sys.argv[1:])
