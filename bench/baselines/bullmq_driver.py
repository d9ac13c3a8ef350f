"""Driver for BullMQ's Python package (Redis queue, Lua scripts): ``Worker(concurrency=...)`` = ``--concurrency``
(100), BullMQ's defaults otherwise (``drainDelay`` 5 s, completed jobs kept), every connection with
``socket_timeout=None`` (see ``connection``). The package has no ``job.waitUntilFinished``; a result is
awaited the way Node's ``waitUntilFinished`` does it: a ``QueueEvents`` consumer (``XREAD BLOCK`` on the
queue's event stream) resolves a future on the job's ``completed`` event; if none arrives within 2 s the
job's state is polled (``getJobState`` every 5 ms) and the sample counted in ``latency_missed_wakeups``."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any
from urllib.parse import unquote, urlsplit

import _driver_common as common
import bullmq
from bullmq import Queue, QueueEvents, Worker

common.check_outside(bullmq)
CHUNK = 1000
PREFIX = "bull"  # BullMQ's default key prefix; every key of a queue is ``bull:<queue name>:...``


async def echo(job: Any, token: str) -> Any:
    return job.data


def connection(url: str) -> dict[str, Any]:
    """BullMQ's connection keyword arguments for ``url``, with ``socket_timeout=None``: redis-py 8 defaults
    to 5 s, shorter than BullMQ's own blocking reads (XREAD BLOCK 10 s, BZPOPMIN up to ``drainDelay`` 5 s),
    which then time out and are retried after a back-off; and a timed socket write lets Python 3.11's
    ``asyncio.wait_for`` swallow the cancel ``QueueEvents.close()`` sends, which then hangs."""
    u = urlsplit(url)
    opts: dict[str, Any] = {"host": u.hostname or "localhost", "port": u.port or 6379,
                            "db": int(u.path.lstrip("/") or 0), "socket_timeout": None}
    if u.username:
        opts["username"] = unquote(u.username)
    if u.password:
        opts["password"] = unquote(u.password)
    return opts


def queue_name(args: Any, scenario: str) -> str:
    return f"rfbench-bullmq-{args.tag}-{scenario}"


def worker_argv(args: Any, scenario: str) -> list[str]:
    return [__file__, "worker", "--url", args.url, "--tag", f"{args.tag}-{scenario}", "--concurrency",
            str(args.concurrency)]


async def worker_main(args: Any) -> None:
    worker = Worker(f"rfbench-bullmq-{args.tag}", echo,
                    {"connection": connection(args.url), "prefix": PREFIX, "concurrency": args.concurrency,
                     "autorun": False})
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Future[Any]] = []
    loop.add_signal_handler(signal.SIGTERM, lambda: stopping.append(asyncio.ensure_future(worker.close())))
    common.print_ready()
    await worker.run()  # returns once close() (on SIGTERM) has stopped the loop
    if stopping:
        await stopping[0]


def cleanup(args: Any, scenario: str) -> None:
    common.Meter(args.url).delete_matching(f"{PREFIX}:{queue_name(args, scenario)}:*")


def open_queue(args: Any, scenario: str) -> Queue:
    return Queue(queue_name(args, scenario), {"connection": connection(args.url), "prefix": PREFIX})


def scenarios(args: Any) -> dict[str, Any]:
    async def drain() -> dict[str, float]:
        meter = common.Meter(args.url)
        mem0 = meter.used_memory()  # before this driver's connections exist
        queue = open_queue(args, "drain")

        async def done() -> int:
            counts = await queue.getJobCounts("completed", "failed")
            if counts["failed"]:
                raise RuntimeError(f"{counts['failed']} jobs failed")
            return int(counts["completed"])

        await done()  # loads the script, so poll_cost measures EVALSHA alone
        cost = await common.poll_cost(meter, done)
        own_a = meter.own
        a = meter.commands()
        for start in range(0, args.n, CHUNK):  # addBulk: one MULTI/EXEC pipeline per chunk
            await queue.addBulk([{"name": "echo", "data": {"i": i}} for i in range(start, min(start + CHUNK, args.n))])
        b = meter.commands()
        worker = common.WorkerProcess(worker_argv(args, "drain"))
        try:
            t1, polls = await common.wait_done(done, args.n, worker, 120 + args.n / 5)
        finally:
            worker.stop()
        own = meter.own - own_a
        c = meter.commands()
        await queue.close()
        await asyncio.sleep(0.2)  # let the server drop the closed connections
        mem1 = meter.used_memory()
        cleanup(args, "drain")
        return common.drain_metrics(args.n, worker.ready_ts, t1, (a, b, c), own, polls * cost, (mem0, mem1))

    async def enqueue_serial() -> dict[str, float]:
        queue = open_queue(args, "serial")
        for i in range(20):
            await queue.add("echo", {"i": i})
        t = time.perf_counter()
        for i in range(args.serial_n):
            await queue.add("echo", {"i": i})
        elapsed = time.perf_counter() - t
        await queue.close()
        cleanup(args, "serial")
        return {"enqueue_serial_per_s": args.serial_n / elapsed}

    async def latency() -> dict[str, float]:
        queue = open_queue(args, "latency")
        # The queue is new, so reading its event stream from the start ("0") misses nothing even if the
        # consumer's first XREAD is sent after the first add; "$" (the default) could miss a warm-up job.
        events = QueueEvents(queue_name(args, "latency"), {"connection": connection(args.url), "prefix": PREFIX,
                                                           "lastEventId": "0"})
        waiting: dict[str, asyncio.Future[Any]] = {}
        finished: dict[str, tuple[str, Any]] = {}  # events that came before their waiter

        def on_event(kind: str) -> Any:
            def handler(payload: dict[str, Any], _entry_id: str) -> None:
                job_id = str(payload.get("jobId"))
                outcome = (kind, payload.get("returnvalue") if kind == "completed" else payload.get("failedReason"))
                fut = waiting.pop(job_id, None)
                if fut is None:
                    finished[job_id] = outcome
                elif not fut.done():
                    fut.set_result(outcome)
            return handler

        events.on("completed", on_event("completed"))
        events.on("failed", on_event("failed"))
        worker = common.WorkerProcess(worker_argv(args, "latency"))
        lost: list[str] = []
        try:
            async def wait_result(job_id: str) -> tuple[str, Any]:
                if job_id in finished:
                    return finished.pop(job_id)
                fut = asyncio.get_running_loop().create_future()
                waiting[job_id] = fut
                try:
                    return await asyncio.wait_for(asyncio.shield(fut), 2)
                except TimeoutError:  # no event seen: poll the job's state, and count it
                    lost.append(job_id)
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline:
                        if fut.done():
                            return fut.result()
                        state = await queue.getJobState(job_id)
                        if state in ("completed", "failed"):
                            waiting.pop(job_id, None)
                            return (state, None)
                        await asyncio.sleep(0.005)
                    raise

            async def one(i: int) -> float:
                t = time.perf_counter()
                job = await queue.add("echo", {"i": i})
                kind, value = await wait_result(str(job.id))
                if kind != "completed":
                    raise RuntimeError(f"job {job.id} {kind}: {value}")
                return time.perf_counter() - t

            samples = await common.sample_latency(one, args)
        finally:
            worker.stop()
            await events.close()
            await queue.close()
        cleanup(args, "latency")
        return {**common.latency_metrics(samples), "latency_missed_wakeups": float(len(lost))}

    return {"drain": drain, "enqueue_serial": enqueue_serial, "latency": latency}


if __name__ == "__main__":
    args = common.parser(__doc__ or "").parse_args()
    if args.mode == "worker":
        asyncio.run(worker_main(args))
    else:
        common.run(args, scenarios(args),
                   f"Worker(concurrency={args.concurrency}), hiredis, socket_timeout=None; results awaited with "
                   "QueueEvents (XREAD BLOCK on the event stream, the job's completed event; the package has no "
                   "waitUntilFinished), getJobState polled if no event within 2 s")
