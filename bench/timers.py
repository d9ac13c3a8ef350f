"""Timers at scale: many delayed and sleeping runs, and how late sleeps wake while they are there.

Three measurements, each under its own prefix, on the harness's server, with the bench worker in a
subprocess (concurrency 100):

- **Delayed enqueue**: ``enqueue_many`` of ``timers_n`` echo runs due in an hour (chunks of 1,000), no
  worker running: runs/s, and bytes per delayed run (``used_memory`` after ``MEMORY PURGE``, before
  and after, divided by the count).
- **Sleeping runs**: ``timers_n`` runs of a workflow that sleeps durably (``ctx.step.wait_for`` with a
  datetime an hour ahead) are started and the worker takes each into its sleep; once every one is
  ``scheduled`` the memory is read again: bytes per sleeping run (header, input, the sleep's step
  record, the due-time entry and the index members).
- **Wake-up lateness in bursts**: with those sleepers still there, ``TIMER_BURSTS`` bursts of
  ``TIMER_BURST_SIZE`` runs each (fewer below 10,000 sleepers) are started. Every run of a burst is
  due at the same instant, bursts are ``TIMER_BURST_GAP_MS`` apart, and the first is ``TIMER_LEAD_MS``
  ahead (time for the worker to take them all into their sleep first). Each run returns the time it
  woke (this machine's clock, the one that set its due time); lateness = woke - due, p50 / p99 / max
  over every burst run.

``python -m bench --no-baselines --only timers`` runs it in the harness (metrics ``timers_*``);
``python -m bench.timers [--url URL] [--n N]`` runs it alone and prints the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from datetime import UTC, datetime
from typing import Any

from redflow import RedflowClient, create_client, set_default_client

from . import report, server
from .redflow_scenarios import WorkerProc
from .workflows import WORKFLOWS, registry

TIMER_BURSTS = 20
TIMER_BURST_SIZE = 100
TIMER_BURST_GAP_MS = 250
TIMER_LEAD_MS = 3000
HOUR_MS = 3_600_000

for _name, _meta in {
    "timers_delayed_enqueue_per_s": ("runs/s", "higher", "enqueue_many of delayed runs (due in 1 h)"),
    "timers_bytes_per_delayed_run": ("bytes", "lower", "memory per delayed run"),
    "timers_bytes_per_sleeping_run": ("bytes", "lower", "memory per sleeping run (durable wait_for)"),
    "timers_into_sleep_per_s": ("runs/s", "higher", "runs taken into their sleep by the worker"),
    "timers_wake_p50_ms": ("ms", "lower", "sleep wake-up lateness p50, bursts of up to 100 beside the sleepers"),
    "timers_wake_p99_ms": ("ms", "lower", "sleep wake-up lateness p99, bursts of up to 100 beside the sleepers"),
    "timers_wake_max_ms": ("ms", "lower", "sleep wake-up lateness max, bursts of up to 100 beside the sleepers"),
    "timers_sleepers": ("runs", "higher", "sleeping runs present while the bursts woke"),
}.items():
    report.METRICS.setdefault(_name, _meta)


def _scheduled_count_args(client: RedflowClient) -> tuple[str, str, str, str]:
    return ("ZLEXCOUNT", client.keys.index, "[s:scheduled:", "(s:scheduled;")


async def _client(url: str, kind: str) -> RedflowClient:
    client = create_client(url=url, prefix=server.new_prefix(kind))
    client.registry = registry
    set_default_client(client)
    await client.store.ensure_ready()
    return client


async def _release(client: RedflowClient) -> None:
    set_default_client(None)
    await server.delete_prefix(client.redis, client.prefix)
    await client.close()


async def _wait_count(meter: Any, args: tuple[str, ...], n: int, worker: WorkerProc | None, timeout_s: float,
                      what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        count = int(await meter.execute(*args))
        if count >= n:
            return
        if worker is not None and not worker.alive():
            raise RuntimeError(f"bench worker died with {count}/{n} {what}: {worker.error_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {count}/{n} {what} after {timeout_s:.0f}s")
        await asyncio.sleep(0.05)


async def delayed_enqueue(url: str, n: int) -> dict[str, float]:
    client = await _client(url, "timers-delayed")
    meter = server.connect(url)
    try:
        mem0 = await server.used_memory(meter)
        due = datetime.fromtimestamp((time.time() * 1000 + HOUR_MS) / 1000, tz=UTC)
        t = time.perf_counter()
        await client.enqueue_many(WORKFLOWS["echo"], [{"i": i} for i in range(n)], run_at=due, chunk_size=1000)
        elapsed = time.perf_counter() - t
        await _wait_count(meter, _scheduled_count_args(client), n, None, 10, "delayed runs")
        mem1 = await server.used_memory(meter)
    finally:
        await meter.close()
        await _release(client)
    return {"timers_delayed_enqueue_per_s": n / elapsed, "timers_bytes_per_delayed_run": (mem1 - mem0) / n}


async def sleepers_and_bursts(url: str, n: int, concurrency: int) -> dict[str, float]:
    client = await _client(url, "timers-sleep")
    meter = server.connect(url)
    worker: WorkerProc | None = None
    timer = WORKFLOWS["timer"]
    try:
        mem0 = await server.used_memory(meter)
        far = int(time.time() * 1000) + HOUR_MS
        worker = await WorkerProc.start(url, client.prefix, concurrency)
        t = time.perf_counter()
        await client.enqueue_many(timer, [{"at": far} for _ in range(n)], chunk_size=1000)
        await _wait_count(meter, _scheduled_count_args(client), n, worker, 120 + n / 200, "runs asleep")
        into_sleep = n / (time.perf_counter() - t)
        mem1 = await server.used_memory(meter)

        size = burst_size(n)
        first = int(time.time() * 1000) + TIMER_LEAD_MS
        dues = [first + b * TIMER_BURST_GAP_MS for b in range(TIMER_BURSTS) for _ in range(size)]
        handles = await client.enqueue_many(timer, [{"at": due} for due in dues], chunk_size=1000)
        woke = await asyncio.gather(*(h.result(timeout_ms=120_000) for h in handles))
        late = sorted(w - due for w, due in zip(woke, dues, strict=True))
        still = int(await meter.execute(*_scheduled_count_args(client)))
    finally:
        if worker is not None:
            await worker.stop()
        await meter.close()
        await _release(client)
    if still < n:
        raise RuntimeError(f"only {still} of {n} sleepers were still asleep after the bursts")
    return {
        "timers_bytes_per_sleeping_run": (mem1 - mem0) / n,
        "timers_into_sleep_per_s": into_sleep,
        "timers_wake_p50_ms": statistics.median(late),
        "timers_wake_p99_ms": late[min(len(late) - 1, int(len(late) * 0.99))],
        "timers_wake_max_ms": late[-1],
        "timers_sleepers": float(still),
    }


def burst_size(n: int) -> int:
    """TIMER_BURST_SIZE, fewer for a small population (the smoke test's)."""
    return min(TIMER_BURST_SIZE, max(1, n // 100))


async def measure(url: str, n: int, concurrency: int = 100) -> dict[str, float]:
    return {**await delayed_enqueue(url, n), **await sleepers_and_bursts(url, n, concurrency)}


async def _scenario(sc: Any) -> dict[str, float]:
    return await measure(sc.url, sc.p.timers_n, sc.p.concurrency)


EXTRA_SCENARIOS = {"timers": _scenario}


async def _main(url: str | None, n: int) -> None:
    with server.BenchServer(url) as srv:
        metrics = await measure(srv.url, n)
    for name, value in metrics.items():
        unit, _, label = report.METRICS[name]
        print(f"{label}: {value:,.1f} {unit}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.timers", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--url", help="use this server (never flushed); default: start an embedded Valkey")
    parser.add_argument("--n", type=int, default=100_000, help="delayed runs and sleeping runs (default 100,000)")
    ns = parser.parse_args()
    asyncio.run(_main(ns.url, ns.n))
