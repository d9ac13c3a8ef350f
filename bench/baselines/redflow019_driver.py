"""Driver for the published redflow 0.1.9, run as a black box through its documented public API.

Runs only inside its own venv (``-E -s``, no PYTHONPATH); refuses to start if ``redflow`` resolves to
anything outside that venv. ``--max-concurrency 0`` keeps the workflow's default (1).
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import _driver_common as common

import redflow
from redflow import StartWorkerOptions, create_client, define_workflow, set_default_client, start_worker

common.check_outside(redflow)
CHUNK = 50  # enqueues in flight while filling the queue for a drain (not measured)


def workflow(args: Any) -> Any:
    async def echo(ctx: Any) -> Any:
        return ctx.input

    extra = {"max_concurrency": args.max_concurrency} if args.max_concurrency > 0 else {}
    return define_workflow("bench-echo", handler=echo, queue="bench", **extra)


def three_step_workflow(args: Any) -> Any:
    async def identity(x: Any) -> Any:
        return x

    async def three_steps(ctx: Any) -> Any:
        a = await ctx.step.run("a", identity, ctx.input)
        b = await ctx.step.run("b", identity, a)
        return await ctx.step.run("c", identity, b)

    extra = {"max_concurrency": args.max_concurrency} if args.max_concurrency > 0 else {}
    return define_workflow("bench-three-step", handler=three_steps, queue="bench", **extra)


def prefix(args: Any, scenario: str) -> str:
    return f"rfb019:{args.tag}:{scenario}"


def worker_argv(args: Any, scenario: str) -> list[str]:
    return [
        __file__, "worker", "--url", args.url, "--tag", f"{args.tag}:{scenario}",
        "--concurrency", str(args.concurrency), "--max-concurrency", str(args.max_concurrency),
    ]


async def worker_main(args: Any) -> None:
    workflow(args)
    three_step_workflow(args)
    worker = await start_worker(
        StartWorkerOptions(app="bench", url=args.url, prefix=f"rfb019:{args.tag}", concurrency=args.concurrency)
    )
    common.print_ready()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await worker.stop()


def client_for(args: Any, scenario: str) -> Any:
    client = create_client(app="bench", url=args.url, prefix=prefix(args, scenario))
    set_default_client(client)
    return client


async def succeeded(client: Any) -> int:
    stats = await client.get_stats()
    return int(stats["by_status"].get("succeeded", 0))


def scenarios(args: Any) -> dict[str, Any]:
    wf = workflow(args)
    wf3 = three_step_workflow(args)

    async def drain() -> dict[str, float]:
        return await drain_of(wf, "drain")

    async def drain_3step() -> dict[str, float]:
        metrics = await drain_of(wf3, "drain3")
        return {"drain_3step_per_s": metrics["drain_per_s"], "drain_3step_seconds": metrics["drain_seconds"],
                "server_3step_cmds_per_run": metrics["server_cmds_per_run"]}

    async def drain_of(wf: Any, scenario: str) -> dict[str, float]:
        meter = common.Meter(args.url)
        mem0 = meter.used_memory()  # before this driver's connections exist
        client = client_for(args, scenario)
        cost = await common.poll_cost(meter, lambda: succeeded(client))
        own_a = meter.own
        a = meter.commands()
        for start in range(0, args.n, CHUNK):
            await asyncio.gather(*(wf.run({"i": i}) for i in range(start, min(start + CHUNK, args.n))))
        b = meter.commands()
        worker = common.WorkerProcess(worker_argv(args, scenario))
        try:
            t1, polls = await common.wait_done(lambda: succeeded(client), args.n, worker, 120 + args.n / 5)
        finally:
            worker.stop()
        own = meter.own - own_a
        c = meter.commands()
        await client.close()
        await asyncio.sleep(0.2)  # let the server drop the closed connections
        mem1 = meter.used_memory()
        meter.delete_matching(prefix(args, scenario) + ":*")
        return common.drain_metrics(args.n, worker.ready_ts, t1, (a, b, c), own, polls * cost, (mem0, mem1))

    async def enqueue_serial() -> dict[str, float]:
        client = client_for(args, "serial")
        for i in range(20):
            await wf.run({"i": i})
        t = time.perf_counter()
        for i in range(args.serial_n):
            await wf.run({"i": i})
        elapsed = time.perf_counter() - t
        await client.close()
        common.Meter(args.url).delete_matching(prefix(args, "serial") + ":*")
        return {"enqueue_serial_per_s": args.serial_n / elapsed}

    async def latency() -> dict[str, float]:
        client = client_for(args, "latency")
        worker = common.WorkerProcess(worker_argv(args, "latency"))
        samples: list[float] = []
        try:
            async def one(i: int) -> float:
                t = time.perf_counter()
                handle = await wf.run({"i": i})
                await handle.result(timeout_ms=30_000)
                return time.perf_counter() - t

            samples = await common.sample_latency(one, args)
        finally:
            worker.stop()
            await client.close()
        common.Meter(args.url).delete_matching(prefix(args, "latency") + ":*")
        return common.latency_metrics(samples)

    async def idle() -> dict[str, float]:
        meter = common.Meter(args.url)
        worker = common.WorkerProcess(worker_argv(args, "idle"))
        try:
            await asyncio.sleep(1.0)  # past start-up
            a = meter.commands()
            t = time.monotonic()
            await asyncio.sleep(args.idle_s)
            b = meter.commands()
            elapsed = time.monotonic() - t
        finally:
            worker.stop()
        meter.delete_matching(prefix(args, "idle") + ":*")
        return {"idle_cmds_per_s": (b - a - 1) / elapsed}

    return {"drain": drain, "drain_3step": drain_3step, "enqueue_serial": enqueue_serial, "latency": latency,
            "idle": idle}


if __name__ == "__main__":
    p = common.parser(__doc__ or "")
    p.add_argument("--max-concurrency", type=int, default=0)
    args = p.parse_args()
    if args.mode == "worker":
        asyncio.run(worker_main(args))
    else:
        mc = args.max_concurrency if args.max_concurrency > 0 else "default (1)"
        common.run(args, scenarios(args), f"concurrency={args.concurrency}, max_concurrency={mc}, hiredis")
