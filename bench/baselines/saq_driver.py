"""Driver for SAQ (Redis queue), worker concurrency ``--concurrency`` (100)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import _driver_common as common
import saq
from saq import Queue, Worker

common.check_outside(saq)
CHUNK = 1000


async def echo(ctx: Any, *, x: Any) -> Any:
    return x


def queue_name(args: Any, scenario: str) -> str:
    return f"rfbench-saq-{args.tag}-{scenario}"


def worker_argv(args: Any, scenario: str) -> list[str]:
    return [__file__, "worker", "--url", args.url, "--tag", f"{args.tag}-{scenario}", "--concurrency",
            str(args.concurrency)]


async def worker_main(args: Any) -> None:
    queue = Queue.from_url(args.url, name=f"rfbench-saq-{args.tag}")

    async def startup(ctx: Any) -> None:
        common.print_ready()

    worker = Worker(queue, functions=[echo], concurrency=args.concurrency, startup=startup)
    await worker.start()  # SIGTERM stops it gracefully


def cleanup(args: Any, scenario: str) -> None:
    meter = common.Meter(args.url)
    meter.delete_matching(f"saq:*{queue_name(args, scenario)}*")


def scenarios(args: Any) -> dict[str, Any]:
    async def drain() -> dict[str, float]:
        meter = common.Meter(args.url)
        mem0 = meter.used_memory()  # before this driver's connections exist
        queue = Queue.from_url(args.url, name=queue_name(args, "drain"))
        await queue.connect()

        async def done() -> int:
            return args.n - await queue.count("incomplete")

        cost = await common.poll_cost(meter, lambda: queue.count("incomplete"))
        own_a = meter.own
        a = meter.commands()
        for start in range(0, args.n, CHUNK):
            await asyncio.gather(*(queue.enqueue("echo", x={"i": i}) for i in range(start, min(start + CHUNK, args.n))))
        b = meter.commands()
        worker = common.WorkerProcess(worker_argv(args, "drain"))
        try:
            t1, polls = await common.wait_done(done, args.n, worker, 120 + args.n / 5)
        finally:
            worker.stop()
        own = meter.own - own_a
        c = meter.commands()
        await queue.disconnect()
        await asyncio.sleep(0.2)  # let the server drop the closed connections
        mem1 = meter.used_memory()
        cleanup(args, "drain")
        return common.drain_metrics(args.n, worker.ready_ts, t1, (a, b, c), own, polls * cost, (mem0, mem1))

    async def enqueue_serial() -> dict[str, float]:
        queue = Queue.from_url(args.url, name=queue_name(args, "serial"))
        await queue.connect()
        for i in range(20):
            await queue.enqueue("echo", x={"i": i})
        t = time.perf_counter()
        for i in range(args.serial_n):
            await queue.enqueue("echo", x={"i": i})
        elapsed = time.perf_counter() - t
        await queue.disconnect()
        cleanup(args, "serial")
        return {"enqueue_serial_per_s": args.serial_n / elapsed}

    async def latency() -> dict[str, float]:
        queue = Queue.from_url(args.url, name=queue_name(args, "latency"))
        await queue.connect()
        worker = common.WorkerProcess(worker_argv(args, "latency"))
        lost: list[int] = []
        try:
            async def one(i: int) -> float:
                t = time.perf_counter()
                job = await queue.enqueue("echo", x={"i": i})
                assert job is not None
                try:  # a pub/sub wait (apply() polls every 0.5 s)
                    await job.refresh(until_complete=2)
                except TimeoutError:  # the completion message was missed: look again, count it
                    lost.append(i)
                    await job.refresh(until_complete=30)
                return time.perf_counter() - t

            samples = await common.sample_latency(one, args)
        finally:
            worker.stop()
            await queue.disconnect()
        cleanup(args, "latency")
        return {**common.latency_metrics(samples), "latency_missed_wakeups": float(len(lost))}

    return {"drain": drain, "enqueue_serial": enqueue_serial, "latency": latency}


if __name__ == "__main__":
    args = common.parser(__doc__ or "").parse_args()
    if args.mode == "worker":
        asyncio.run(worker_main(args))
    else:
        common.run(args, scenarios(args), f"Worker(concurrency={args.concurrency}), hiredis")
