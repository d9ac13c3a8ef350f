"""A worker process for the process tests: ``python -m tests.process.worker_proc URL PREFIX [CONCURRENCY]``.

It serves tests.process.apps until SIGTERM, then drains gracefully and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from redflow import StartWorkerOptions, create_client, set_default_client, start_worker

from .apps import registry


async def main(url: str, prefix: str, concurrency: int, lease_ms: int) -> None:
    set_default_client(create_client(url=url, prefix=prefix))
    worker = await start_worker(
        StartWorkerOptions(
            app="proc-test", url=url, prefix=prefix, registry=registry, concurrency=concurrency,
            lease_ms=lease_ms, grace_period_ms=5000,
        )
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await worker.stop()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    url, prefix = sys.argv[1], sys.argv[2]
    concurrency = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    lease_ms = int(sys.argv[4]) if len(sys.argv) > 4 else 1500
    asyncio.run(main(url, prefix, concurrency, lease_ms))
