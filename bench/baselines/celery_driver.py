"""Driver for Celery with the Redis broker and Redis result backend: worker ``--pool=threads
--concurrency=100`` (plus --without-gossip/--without-mingle/--without-heartbeat for a quick start)."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import _driver_common as common
import celery
from celery import Celery
from celery.signals import worker_ready

common.check_outside(celery)


def make_app(url: str) -> Celery:
    app = Celery("rfbench", broker=url, backend=url)
    app.conf.update(
        broker_connection_retry_on_startup=True, worker_hijack_root_logger=False, worker_redirect_stdouts=False
    )
    return app


def queue_name(args: Any, scenario: str) -> str:
    return f"rfbench-celery-{args.tag}-{scenario}"


def worker_argv(args: Any, scenario: str) -> list[str]:
    return [__file__, "worker", "--url", args.url, "--tag", f"{args.tag}-{scenario}", "--concurrency",
            str(args.concurrency)]


def define(app: Celery) -> Any:
    @app.task(name="rfbench.echo")
    def echo(x: Any) -> Any:
        return x

    return echo


def worker_main(args: Any) -> None:
    app = make_app(args.url)
    define(app)

    @worker_ready.connect
    def ready(**_: Any) -> None:
        common.print_ready()

    app.worker_main([
        "worker", "--pool=threads", f"--concurrency={args.concurrency}", "-Q", f"rfbench-celery-{args.tag}",
        "--loglevel=WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat",
    ])


def cleanup(args: Any, scenario: str, ids: list[str]) -> None:
    q = queue_name(args, scenario)
    keys = [*(f"celery-task-meta-{i}" for i in ids), q, f"_kombu.binding.{q}", f"_kombu.binding_permanent.{q}"]
    common.Meter(args.url).delete(keys)


def scenarios(args: Any) -> dict[str, Any]:
    app = make_app(args.url)
    echo = define(app)

    def send(scenario: str, i: int) -> Any:
        return echo.apply_async(({"i": i},), queue=queue_name(args, scenario))

    def drain() -> dict[str, float]:
        meter = common.Meter(args.url)
        warm = send("drain", -1).id  # connects the producer outside the measurement
        mem0 = meter.used_memory()
        own_a = meter.own
        a = meter.commands()
        ids = [send("drain", i).id for i in range(args.n)]
        b = meter.commands()
        keys = [f"celery-task-meta-{i}" for i in ids]
        worker = common.WorkerProcess(worker_argv(args, "drain"))
        try:
            t1, _ = asyncio.run(common.wait_done(lambda: meter.exists_count(keys), args.n, worker, 120 + args.n / 5))
        finally:
            worker.stop()
        own = meter.own - own_a
        c = meter.commands()
        mem1 = meter.used_memory()
        cleanup(args, "drain", [warm, *ids])
        return common.drain_metrics(args.n, worker.ready_ts, t1, (a, b, c), own, 0, (mem0, mem1))

    def enqueue_serial() -> dict[str, float]:
        ids = [send("serial", i).id for i in range(20)]
        t = time.perf_counter()
        for i in range(args.serial_n):
            ids.append(send("serial", i).id)
        elapsed = time.perf_counter() - t
        cleanup(args, "serial", ids)
        return {"enqueue_serial_per_s": args.serial_n / elapsed}

    def latency() -> dict[str, float]:
        ids: list[str] = []
        worker = common.WorkerProcess(worker_argv(args, "latency"))

        def one(i: int) -> float:
            t = time.perf_counter()
            result = send("latency", i)
            result.get(timeout=30)
            ids.append(result.id)
            return time.perf_counter() - t

        try:
            samples = asyncio.run(common.sample_latency(one, args))
        finally:
            worker.stop()
        cleanup(args, "latency", ids)
        return common.latency_metrics(samples)

    return {"drain": drain, "enqueue_serial": enqueue_serial, "latency": latency}


if __name__ == "__main__":
    args = common.parser(__doc__ or "").parse_args()
    if args.mode == "worker":
        sys.argv = sys.argv[:1]
        worker_main(args)
    else:
        common.run(args, scenarios(args), f"--pool=threads --concurrency={args.concurrency}, hiredis")
