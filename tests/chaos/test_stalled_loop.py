"""A worker process paused while a step record is in flight: the server writes the record, the
process stops before it reads the reply, its lease lapses and another worker takes the run over.
When the process runs again, the record's reply (kept by a proxy until then) and its overdue lease
timers are ready at once. The reply says the record was written; the worker must still not start
the next step, which the other worker has run by then.

The paused worker is this module: ``python -m tests.chaos.test_stalled_loop URL PREFIX LOGDIR``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

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

from ..conftest import wait_until
from .proxy import FaultProxy
from .worker_procs import WorkerProcs

pytestmark = pytest.mark.timeout(90)

SL = WorkflowRegistry()
OPTIONS = {"concurrency": 4, "lease_ms": 1500, "grace_period_ms": 500, "blmove_timeout_sec": 1.0,
           "reaper_interval_ms": 200}


def _log(line: str) -> None:
    with open(Path(os.environ["SL_LOG_DIR"]) / f"{os.getpid()}.log", "a") as f:
        f.write(f"{os.getpid()} {line}\n")


async def _first(ctx: WorkflowHandlerContext) -> str:
    _log("a")
    await asyncio.sleep(0.05)  # the test holds the replies meanwhile
    return "a"


async def _second(ctx: WorkflowHandlerContext) -> str:
    _log("b")
    return "b"


async def sl_steps(ctx: WorkflowHandlerContext) -> list[str]:
    return [await ctx.step.run("a", _first, ctx), await ctx.step.run("b", _second, ctx)]


define_workflow("sl-steps", handler=sl_steps, registry=SL)


async def _worker_main(url: str, prefix: str, logs: str) -> None:
    os.environ["SL_LOG_DIR"] = logs
    worker = await start_worker(StartWorkerOptions(app="sl", url=url, prefix=prefix, registry=SL, **OPTIONS))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await worker.stop()


def _starts(logs: Path) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    for path in logs.glob("*.log"):
        if path.stem.isdigit():
            out += [(int(pid), step) for pid, step in (line.split() for line in path.read_text().splitlines())]
    return out


async def _recorded(client: RedflowClient, run_id: str, name: str) -> bool:
    return any(s["name"] == name and s["status"] == "succeeded" for s in await client.get_run_steps(run_id))


async def test_a_record_answered_after_a_pause_does_not_start_the_next_step(
    redis_url: str, prefix: str, tmp_path: Path, proxy: FaultProxy
) -> None:
    os.environ["SL_LOG_DIR"] = str(tmp_path)
    client = create_client(url=redis_url, prefix=prefix)
    client.registry = SL
    procs = WorkerProcs("tests.chaos.test_stalled_loop", proxy.url, prefix, tmp_path)
    survivor = None
    try:
        paused = await procs.start(str(tmp_path))
        handle = await client.enqueue_definition(SL.get("sl-steps"), None)  # type: ignore[arg-type]
        await wait_until(lambda: (paused.pid, "a") in _starts(tmp_path), timeout_s=30, interval_s=0.002,
                         what="step a started")
        proxy.hold_replies()
        await wait_until(lambda: _recorded(client, handle.id, "a"), timeout_s=5, interval_s=0.002,
                         what="step a recorded")
        paused.send_signal(signal.SIGSTOP)  # its reply is held: the process never read it
        survivor = await start_worker(StartWorkerOptions(app="sl", url=redis_url, prefix=prefix, registry=SL,
                                                         **OPTIONS))
        assert await handle.result(timeout_ms=30_000) == ["a", "b"]
        assert _starts(tmp_path).count((os.getpid(), "b")) == 1  # the survivor took the run over
        proxy.release_replies()
        paused.send_signal(signal.SIGCONT)
        lapsed = tmp_path / "worker-0.log"
        await wait_until(lambda: "lease lapsed" in lapsed.read_text(), timeout_s=20,
                         what="the paused worker learning that its lease lapsed")
        starts = _starts(tmp_path)
        assert starts.count((paused.pid, "a")) == 1
        assert [s for s in starts if s[1] == "b"] == [(os.getpid(), "b")], starts
    finally:
        if survivor is not None:
            await survivor.stop()
        procs.close()
        await client.close()


if __name__ == "__main__":
    asyncio.run(_worker_main(*sys.argv[1:4]))
