"""The body of one forked worker process: a uvloop event loop running one worker until told to stop.

Exit codes: 0 after a requested drain, RECYCLE after reaching its run budget (restart at once), and
anything else for a crash (restart with backoff).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from .._redis.errors import RedisError
from ..types import StartWorkerOptions
from ..worker.worker import Worker, start_worker
from .config import SupervisorConfig

RECYCLE = 75
PR_SET_PDEATHSIG = 1

log = logging.getLogger("redflow.supervisor")


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGTERM when the supervisor dies, so no worker outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the supervisor died before prctl took effect
        os._exit(0)


def run_child(config: SupervisorConfig, url: str, slot: int, status_dir: Path, parent_pid: int) -> int:
    die_with_parent(parent_pid)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - Windows
        pass
    return asyncio.run(_main(config, url, slot, status_dir))


START_BACKOFF_MAX_S = 10.0


async def _start(
    config: SupervisorConfig, url: str, stop: asyncio.Event, status_file: Path, slot: int
) -> Worker | None:
    """Start the worker, retrying with backoff while Redis is unreachable (one line per attempt, no
    traceback, no crash loop); None when a stop came first."""
    delay = 0.5
    attempt = 0
    while not stop.is_set():
        attempt += 1
        try:
            return await start_worker(
                StartWorkerOptions(
                    app=config.app, url=url, prefix=config.prefix, queues=config.queues,
                    concurrency=config.concurrency, grace_period_ms=int(config.grace_period_s * 1000),
                    lease_ms=config.lease_ms,
                )
            )
        except RedisError as exc:
            log.warning("worker process %d: cannot start (attempt %d): %s; retrying in %.1fs", os.getpid(), attempt,
                        exc, delay)
        _write_status(status_file, None, slot)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await stop.wait()
        delay = min(delay * 2, START_BACKOFF_MAX_S)
    return None


async def _main(config: SupervisorConfig, url: str, slot: int, status_dir: Path) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    status_file = status_dir / f"worker-{os.getpid()}.json"
    started = await _start(config, url, stop, status_file, slot)
    if started is None:
        with contextlib.suppress(OSError):
            status_file.unlink()
        return 0
    worker = started
    worker.run_budget = config.max_runs_per_proc
    code = 0
    try:
        while not stop.is_set():
            _write_status(status_file, worker, slot)
            if worker.budget_spent.is_set():
                claimed = sum(w.runs_claimed for w in worker.group)
                log.info("worker process %d claimed its %d runs: recycling", os.getpid(), claimed)
                code = RECYCLE
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await _first(stop, worker.budget_spent)
    finally:
        await worker.stop()
        with contextlib.suppress(OSError):
            status_file.unlink()
    return code


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


def _write_status(path: Path, worker: Worker | None, slot: int) -> None:
    """The status the supervisor serves; ``ts`` proves the event loop still turns."""
    status = {
        "pid": os.getpid(),
        "slot": slot,
        "worker_id": worker.id if worker else None,
        "ready": worker.ready if worker else False,
        "leader": worker.is_leader if worker else False,
        "leader_value": worker.leader_value if worker else "",
        "active_runs": worker.inflight() if worker else 0,
        "runs_done": sum(w.runs_done for w in worker.group) if worker else 0,
        "ts": time.time(),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status))
    tmp.replace(path)


def child_entry(config: SupervisorConfig, url: str, slot: int, status_dir: Path, parent_pid: int) -> None:
    """Run in the forked child; never returns."""
    # Right after fork: the supervisor's handlers must not run here (the event loop installs its own).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    code = 1
    try:
        code = run_child(config, url, slot, status_dir, parent_pid)
    except BaseException:
        log.exception("worker process %d crashed", os.getpid())
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
