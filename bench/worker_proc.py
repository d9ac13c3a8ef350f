"""The bench worker process: ``python -m bench.worker_proc URL PREFIX [--concurrency N] [--idle S]``.

Prints ``ready <unix time> <process CPU seconds>`` once the worker has started (it claims from then on). On
SIGTERM (or after ``--idle`` seconds) it stops and prints one ``stats <json>`` line with the worker's own
command counters and ``cpu_s``, its process CPU time (user + sys, ``time.process_time``) when the signal came.
With ``--idle`` it first waits for leadership, then counts commands over the window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time

import redflow
from redflow import StartWorkerOptions, start_worker

from .workflows import registry


def configure_tracing(mode: str) -> None:
    """--tracing off: REDFLOW_TRACING=0; installed: the API installed, no provider configured (what an
    application gets that did not set one up); sdk: an OpenTelemetry SDK provider whose spans are
    batched to an exporter that drops them (the cost of recording spans, without a collector)."""
    if mode == "off":
        os.environ["REDFLOW_TRACING"] = "0"
        return
    if mode == "installed":
        return
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Dropping(SpanExporter):
        def export(self, spans: object) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Dropping()))
    trace.set_tracer_provider(provider)


async def main(args: argparse.Namespace) -> None:
    configure_tracing(args.tracing)
    worker = await start_worker(
        StartWorkerOptions(
            app="bench", url=args.url, prefix=args.prefix, registry=registry, concurrency=args.concurrency,
        )
    )
    print(f"ready {time.time():.6f} {time.process_time():.6f}", flush=True)
    counters = worker.store.redis.counters
    stats: dict[str, object] = {}
    if args.idle > 0:
        for _ in range(300):  # up to 15 s for the first heartbeat to win leadership
            if worker.is_leader:
                break
            await asyncio.sleep(0.05)
        start, by_name = counters.commands, dict(counters.by_name)
        t0 = time.monotonic()
        await asyncio.sleep(args.idle)
        elapsed = time.monotonic() - t0
        sent = counters.commands - start
        stats["idle_commands"] = sent
        stats["idle_seconds"] = elapsed
        stats["idle_by_name"] = {k: v - by_name.get(k, 0) for k, v in counters.by_name.items() if v != by_name.get(k)}
        stats["leader"] = worker.is_leader
    else:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
    stats["cpu_s"] = time.process_time()
    stats["commands"] = counters.commands
    stats["writes"] = counters.writes
    stats["by_name"] = dict(counters.by_name)
    stats["redflow_file"] = redflow.__file__
    await worker.stop(grace_period_ms=2000)
    print("stats " + json.dumps(stats), flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("prefix")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--idle", type=float, default=0.0)
    parser.add_argument("--tracing", choices=("off", "installed", "sdk"), default="off")
    asyncio.run(main(parser.parse_args()))
