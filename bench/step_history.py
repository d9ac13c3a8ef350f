"""Step writes are append-only: the cost of a step does not grow with the run's history.

One run of 200 sequential ``ctx.step.run`` steps goes through a real worker (started in this process,
concurrency 1, on the same server as the other scenarios). The handler times every ``step.run`` with
``time.perf_counter`` (the step's function is an async identity, so what is timed is encoding the output
and the fenced ``step.lua`` write with its round trip) and returns the 200 timings as its output. The
scenario reports the median of steps 1-50 and of steps 151-200 and their ratio, once with a ``null``
output per step and once with a ~1 KB string per step (a 200 KB history by the end).

``python -m bench --no-baselines --only steps`` runs it in the harness (metrics ``steps_*``);
``python -m bench.step_history [--url URL] [--reps K]`` runs it alone and prints the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redflow import (
    StartWorkerOptions,
    WorkflowHandlerContext,
    WorkflowRegistry,
    create_client,
    define_workflow,
    set_default_client,
    start_worker,
)

from . import report, server

STEPS = 200
WINDOW = 50  # steps 1-50 against steps 151-200
PAYLOADS = (("steps", 0), ("steps_1k", 1000))  # (metric prefix, bytes of each step's output string)
QUEUE = "bench-steps"

registry = WorkflowRegistry()


async def _identity(x: Any) -> Any:
    return x


async def _many_steps(ctx: WorkflowHandlerContext[Any]) -> Any:
    size = ctx.input["payload_bytes"]
    payload = "x" * size if size else None
    timings = []
    for i in range(STEPS):
        t = time.perf_counter()
        await ctx.step.run(f"s{i}", _identity, payload)
        timings.append(time.perf_counter() - t)
    return timings


many_steps = define_workflow("bench-many-steps", handler=_many_steps, queue=QUEUE, registry=registry)

for _prefix, _what in (("steps", "step.run of a 200-step run"), ("steps_1k", "step.run with 1 KB output")):
    report.METRICS.setdefault(f"{_prefix}_first50_ms", ("ms", "lower", f"{_what}, median of steps 1-50"))
    report.METRICS.setdefault(f"{_prefix}_last50_ms", ("ms", "lower", f"{_what}, median of steps 151-200"))
    report.METRICS.setdefault(f"{_prefix}_ratio", ("x", "lower", f"{_what}, steps 151-200 / steps 1-50"))


def summarize(prefix: str, timings_s: list[float]) -> dict[str, float]:
    if len(timings_s) != STEPS:
        raise RuntimeError(f"expected {STEPS} step timings, got {len(timings_s)}")
    first = statistics.median(timings_s[:WINDOW]) * 1000
    last = statistics.median(timings_s[-WINDOW:]) * 1000
    return {f"{prefix}_first50_ms": first, f"{prefix}_last50_ms": last, f"{prefix}_ratio": last / first}


async def measure(url: str) -> dict[str, float]:
    """One 200-step run per payload size through an in-process worker; the metrics of both."""
    client = create_client(url=url, prefix=server.new_prefix("steps"))
    client.registry = registry
    set_default_client(client)
    worker = None
    metrics: dict[str, float] = {}
    try:
        await client.store.ensure_ready()
        worker = await start_worker(StartWorkerOptions(
            app="bench-steps", url=url, prefix=client.prefix, registry=registry, queues=[QUEUE], concurrency=1,
        ))
        for prefix, size in PAYLOADS:
            handle = await many_steps.run({"payload_bytes": size})
            timings = await handle.result(timeout_ms=600_000)
            metrics.update(summarize(prefix, timings))
    finally:
        if worker is not None:
            await worker.stop(grace_period_ms=2000)
        set_default_client(None)
        await server.delete_prefix(client.redis, client.prefix)
        await client.close()
    return metrics


async def _scenario(sc: Any) -> dict[str, float]:
    return await measure(sc.url)


# Scenarios of this file for ``python -m bench`` (bench/cli.py): name -> coroutine of the Scenarios object.
EXTRA_SCENARIOS: dict[str, Callable[[Any], Awaitable[dict[str, float]]]] = {"steps": _scenario}


async def _main(url: str | None, reps: int) -> None:
    with server.BenchServer(url) as srv:
        runs = [await measure(srv.url) for _ in range(reps)]
    print(f"{STEPS} sequential steps, one run per payload, {reps} repetition(s); per-step wall time in ms")
    print("| payload | steps 1-50 (median) | steps 151-200 (median) | ratio |")
    print("|---|---:|---:|---:|")
    for prefix, size in PAYLOADS:
        first = statistics.median(r[f"{prefix}_first50_ms"] for r in runs)
        last = statistics.median(r[f"{prefix}_last50_ms"] for r in runs)
        ratios = [r[f"{prefix}_ratio"] for r in runs]
        spread = f" [{min(ratios):.2f}-{max(ratios):.2f}]" if reps > 1 else ""
        print(f"| {'null' if not size else f'{size} B'} | {first:.3f} | {last:.3f} "
              f"| {statistics.median(ratios):.2f}x{spread} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.step_history", description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="use this server (never flushed); default: start an embedded Valkey")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(_main(args.url, args.reps))
