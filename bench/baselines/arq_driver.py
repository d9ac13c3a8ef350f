"""Driver for arq: ``max_jobs`` = ``--concurrency`` (100), worker ``poll_delay`` ``--poll-delay`` (0.01 s;
arq's default is 0.5 s), results awaited with ``Job.result(poll_delay=0.005)`` (default 0.5 s)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import _driver_common as common
import arq
from arq import create_pool
from arq.connections import RedisSettings
from arq.worker import Worker

common.check_outside(arq)
CHUNK = 1000


async def echo(ctx: Any, x: Any) -> Any:
    return x


def queue_name(args: Any, scenario: str) -> str:
    return f"rfbench-arq-{args.tag}-{scenario}"


def worker_argv(args: Any, scenario: str) -> list[str]:
    return [__file__, "worker", "--url", args.url, "--tag", f"{args.tag}-{scenario}", "--concurrency",
            str(args.concurrency), "--poll-delay", str(args.poll_delay)]


def worker_main(args: Any) -> None:
    async def startup(ctx: Any) -> None:
        common.print_ready()

    worker = Worker(
        functions=[echo], queue_name=f"rfbench-arq-{args.tag}", redis_settings=RedisSettings.from_dsn(args.url),
        max_jobs=args.concurrency, poll_delay=args.poll_delay, on_startup=startup, log_results=False,
    )
    worker.run()  # SIGTERM stops it gracefully


def cleanup(args: Any, scenario: str, ids: list[str]) -> None:
    meter = common.Meter(args.url)
    keys = [f"arq:{kind}:{i}" for i in ids for kind in ("job", "result", "in-progress", "retry")]
    meter.delete([*keys, queue_name(args, scenario), queue_name(args, scenario) + ":health-check"])


def scenarios(args: Any) -> dict[str, Any]:
    async def pool_for(scenario: str) -> Any:
        return await create_pool(RedisSettings.from_dsn(args.url), default_queue_name=queue_name(args, scenario))

    async def drain() -> dict[str, float]:
        meter = common.Meter(args.url)
        mem0 = meter.used_memory()  # before this driver's connections exist
        pool = await pool_for("drain")
        own_a = meter.own
        a = meter.commands()
        ids: list[str] = []
        for start in range(0, args.n, CHUNK):
            chunk = range(start, min(start + CHUNK, args.n))
            jobs = await asyncio.gather(*(pool.enqueue_job("echo", {"i": i}) for i in chunk))
            ids += [j.job_id for j in jobs]
        b = meter.commands()
        result_keys = [f"arq:result:{i}" for i in ids]
        worker = common.WorkerProcess(worker_argv(args, "drain"))
        try:
            t1, _ = await common.wait_done(lambda: meter.exists_count(result_keys), args.n, worker, 120 + args.n / 5)
        finally:
            worker.stop()
        own = meter.own - own_a
        c = meter.commands()
        await pool.aclose()
        await asyncio.sleep(0.2)  # let the server drop the closed connections
        mem1 = meter.used_memory()
        cleanup(args, "drain", ids)
        return common.drain_metrics(args.n, worker.ready_ts, t1, (a, b, c), own, 0, (mem0, mem1))

    async def enqueue_serial() -> dict[str, float]:
        pool = await pool_for("serial")
        ids = [(await pool.enqueue_job("echo", {"i": i})).job_id for i in range(20)]
        t = time.perf_counter()
        for i in range(args.serial_n):
            ids.append((await pool.enqueue_job("echo", {"i": i})).job_id)
        elapsed = time.perf_counter() - t
        await pool.aclose()
        cleanup(args, "serial", ids)
        return {"enqueue_serial_per_s": args.serial_n / elapsed}

    async def latency() -> dict[str, float]:
        pool = await pool_for("latency")
        ids: list[str] = []
        worker = common.WorkerProcess(worker_argv(args, "latency"))
        try:
            async def one(i: int) -> float:
                t = time.perf_counter()
                job = await pool.enqueue_job("echo", {"i": i})
                await job.result(timeout=30, poll_delay=0.005)
                ids.append(job.job_id)
                return time.perf_counter() - t

            samples = await common.sample_latency(one, args)
        finally:
            worker.stop()
            await pool.aclose()
        cleanup(args, "latency", ids)
        return common.latency_metrics(samples)

    return {"drain": drain, "enqueue_serial": enqueue_serial, "latency": latency}


if __name__ == "__main__":
    p = common.parser(__doc__ or "")
    p.add_argument("--poll-delay", type=float, default=0.01)
    args = p.parse_args()
    if args.mode == "worker":
        worker_main(args)
    else:
        common.run(args, scenarios(args), f"max_jobs={args.concurrency}, poll_delay={args.poll_delay}s, hiredis")
