"""A log of step executions written by chaos worker processes, read back by the test that killed or
paused them: each step body appends ``start``/``end`` lines (time, pid, run, step) to a file of its
process under the directory named by ``$CHAOS_STEP_LOG``, so the test knows which executions a kill
may repeat (those of the process it stopped) and which it may not."""

from __future__ import annotations

import asyncio
import os
import time
from collections import defaultdict
from pathlib import Path

from redflow import RedflowClient, WorkflowHandlerContext

ENV = "CHAOS_STEP_LOG"
ENDED = ("succeeded", "failed", "canceled")


def _write(line: str) -> None:
    with open(Path(os.environ[ENV]) / f"{os.getpid()}.log", "a") as f:
        f.write(line + "\n")


async def logged_step(ctx: WorkflowHandlerContext, step: str, seconds: float) -> str:
    """A step body that takes ``seconds`` and logs its start and end; returns ``<input>:<step>``."""
    _write(f"start {time.time():.6f} {os.getpid()} {ctx.run.id} {step}")
    await asyncio.sleep(seconds)
    _write(f"end {time.time():.6f} {os.getpid()} {ctx.run.id} {step}")
    return f"{ctx.input}:{step}"


def executions(logs: Path) -> dict[tuple[str, str], list[tuple[float, str, int]]]:
    """(run, step) -> [(time, phase, pid)] in time order (one machine's clock)."""
    out: dict[tuple[str, str], list[tuple[float, str, int]]] = defaultdict(list)
    for path in logs.glob("*.log"):
        if not path.stem.isdigit():
            continue
        for line in path.read_text().splitlines():
            phase, at, pid, run_id, step = line.split()
            out[(run_id, step)].append((float(at), phase, int(pid)))
    return {key: sorted(events) for key, events in out.items()}


async def ended_at_least(client: RedflowClient, ids: list[str], n: int) -> bool:
    headers = await client.store.read_headers(ids)
    return sum(1 for h in headers if h is not None and h.status in ENDED) >= n
