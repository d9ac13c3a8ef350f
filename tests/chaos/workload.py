"""The chaos workload and its worker process.

``python -m tests.chaos.workload URL PREFIX LOG_DIR CONCURRENCY LEASE_MS [PROBE_QUEUE]``.

Every step body and every on_failure call appends lines to ``LOG_DIR/exec-<pid>.log`` with one
``os.write`` on an O_APPEND descriptor (no buffering: a SIGKILL loses nothing already written, and a
server that loses data cannot lose these). A line is tab-separated:

    phase  run_id  step  token  time.time()  pid

``phase`` is ``start`` (the body began), ``end`` (it returned ``token``, which becomes the step's
recorded output), ``raise`` (it failed on purpose), ``hook-start`` / ``hook-end`` (on_failure). The
checker in test_workload.py compares these with what the server recorded.

The process serves until SIGTERM, then drains and exits 0. With PROBE_QUEUE it also claims from that
queue, which only this process serves: a ``chaos-probe`` run sent there proves that its claim loop
still works after the faults (tests/chaos/supervised.py runs the same workload under the supervisor).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import sys
import time
import uuid
from typing import Any

from redflow import (
    StartWorkerOptions,
    WorkflowHandlerContext,
    WorkflowRegistry,
    WorkflowRetryPolicy,
    create_client,
    define_workflow,
    set_default_client,
    start_worker,
)

registry = WorkflowRegistry()

EVENT = "chaos.ping"
CANCEL_SLEEP = "120s"  # runs of chaos-cancel only end when the driver cancels them
STEP_S = float(os.environ.get("CHAOS_STEP_MS", "20")) / 1000  # mean duration of a step body
# With CHAOS_HANDOFF_FILE set, while that file exists, the first run of the process (of a workflow the
# driver never cancels) to record its last step logs ``handoff`` and waits before it returns, i.e.
# before its finish is written: a test can SIGKILL the process between a step record and the finish.
HANDOFF_FILE = os.environ.get("CHAOS_HANDOFF_FILE")
HANDOFF_PAUSE_S = 600.0
_fd: int | None = None
_seq = 0
_handoff_done = False


def _log(phase: str, run_id: str, step: str, token: str = "-") -> None:
    global _fd
    if _fd is None:
        path = os.path.join(os.environ["CHAOS_LOG_DIR"], f"exec-{os.getpid()}.log")
        _fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_fd, f"{phase}\t{run_id}\t{step}\t{token}\t{time.time():.6f}\t{os.getpid()}\n".encode())


def body(ctx: WorkflowHandlerContext[Any], step: str, *, fail_first_attempt: bool = False) -> Any:
    """A step body that logs its execution and returns a token unique to this execution."""

    async def run() -> str:
        global _seq
        _log("start", ctx.run.id, step)
        await asyncio.sleep(STEP_S * (0.5 + random.random()))
        if fail_first_attempt and ctx.run.attempt == 1:
            _log("raise", ctx.run.id, step)
            raise RuntimeError(f"{step} fails on the first attempt")
        _seq += 1
        token = f"{os.getpid()}.{_seq}.{uuid.uuid4().hex[:6]}"
        _log("end", ctx.run.id, step, token)
        return token

    return run


async def steps(ctx: WorkflowHandlerContext[Any]) -> list[str]:
    return [await ctx.step.run(name, body(ctx, name)) for name in ("a", "b", "c")]


def _handoff_armed() -> bool:
    return bool(HANDOFF_FILE) and not _handoff_done and os.path.exists(HANDOFF_FILE)  # type: ignore[arg-type]


async def handoff(ctx: WorkflowHandlerContext[Any]) -> None:
    """Once per process, with CHAOS_HANDOFF_FILE only, while the file exists: log ``handoff`` and
    wait (see above). Called by chaos-sleep, chaos-event and chaos-retry, which the driver never
    cancels, so the paused run stays running until its worker dies (or loses its lease)."""
    global _handoff_done
    if _handoff_armed():
        _handoff_done = True
        _log("handoff", ctx.run.id, "-")
        await asyncio.sleep(HANDOFF_PAUSE_S)


async def sleeper(ctx: WorkflowHandlerContext[Any]) -> list[str]:
    first = await ctx.step.run("a", body(ctx, "a"))
    await ctx.step.wait_for("nap", f"{ctx.input.get('nap_ms', 300)}ms")
    out = [first, await ctx.step.run("b", body(ctx, "b"))]
    await handoff(ctx)
    return out


async def waiter(ctx: WorkflowHandlerContext[Any]) -> Any:
    first = await ctx.step.run("a", body(ctx, "a"))
    event = await ctx.step.wait_for_event("ev", EVENT, ctx.run.id, "90s")
    second = await ctx.step.run("b", body(ctx, "b"))
    await handoff(ctx)
    return [first, second, None if event is None else event["data"]]


async def child(ctx: WorkflowHandlerContext[Any]) -> str:
    token = await ctx.step.run("c1", body(ctx, "c1"))
    await ctx.step.wait_for("child-nap", "100ms")
    return token


async def parent(ctx: WorkflowHandlerContext[Any]) -> list[str]:
    first = await ctx.step.run("a", body(ctx, "a"))
    kid = await ctx.step.run_workflow("kid", "chaos-child", {"parent": ctx.run.id})
    return [first, kid, await ctx.step.run("b", body(ctx, "b"))]


async def flaky(ctx: WorkflowHandlerContext[Any]) -> list[str]:
    first = await ctx.step.run("a", body(ctx, "a"))
    out = [first, await ctx.step.run("flaky", body(ctx, "flaky", fail_first_attempt=True))]
    await handoff(ctx)
    return out


async def doomed(ctx: WorkflowHandlerContext[Any]) -> None:
    await ctx.step.run("a", body(ctx, "a"))
    raise RuntimeError("chaos-fail always fails")


async def cancel_target(ctx: WorkflowHandlerContext[Any]) -> str:
    first = await ctx.step.run("a", body(ctx, "a"))
    await ctx.step.wait_for("long", CANCEL_SLEEP)
    await ctx.step.run("b", body(ctx, "b"))
    return first


async def hook(ctx: Any) -> None:
    _log("hook-start", ctx.run.id, "on_failure")
    await asyncio.sleep(random.random() * 0.02)
    _log("hook-end", ctx.run.id, "on_failure")


async def probe(ctx: WorkflowHandlerContext[Any]) -> int:
    return os.getpid()


FAST_RETRY = WorkflowRetryPolicy(max_attempts=3, delay=50)

define_workflow("chaos-steps", handler=steps, registry=registry, on_failure=hook, retries=FAST_RETRY)
define_workflow("chaos-sleep", handler=sleeper, registry=registry, on_failure=hook, retries=FAST_RETRY)
define_workflow("chaos-event", handler=waiter, registry=registry, on_failure=hook, retries=FAST_RETRY)
# A limit it never reaches: its runs go through admission, and under a prefix with several partitions
# they live in p0, so a parent elsewhere starts and awaits its child across partitions (hand-offs).
define_workflow("chaos-child", handler=child, registry=registry, on_failure=hook, retries=FAST_RETRY,
                max_concurrency=10_000)
define_workflow("chaos-parent", handler=parent, registry=registry, on_failure=hook, retries=FAST_RETRY)
define_workflow("chaos-retry", handler=flaky, registry=registry, on_failure=hook, retries=FAST_RETRY)
define_workflow("chaos-fail", handler=doomed, registry=registry, on_failure=hook,
                retries=WorkflowRetryPolicy(max_attempts=2, delay=50))
define_workflow("chaos-cancel", handler=cancel_target, registry=registry, on_failure=hook, retries=FAST_RETRY)
define_workflow("chaos-probe", handler=probe, registry=registry)

# What each workflow ends as when nobody cancels it.
DESIGNED_STATUS = {
    "chaos-steps": "succeeded", "chaos-sleep": "succeeded", "chaos-event": "succeeded", "chaos-child": "succeeded",
    "chaos-parent": "succeeded", "chaos-retry": "succeeded", "chaos-fail": "failed", "chaos-cancel": "canceled",
    "chaos-probe": "succeeded",
}
# The step bodies of each workflow (recorded outputs are checked against the logs).
STEP_NAMES = {
    "chaos-steps": ("a", "b", "c"), "chaos-sleep": ("a", "b"), "chaos-event": ("a", "b"), "chaos-child": ("c1",),
    "chaos-parent": ("a", "b"), "chaos-retry": ("a", "flaky"), "chaos-fail": ("a",), "chaos-cancel": ("a", "b"),
    "chaos-probe": (),
}


async def main(url: str, prefix: str, concurrency: int, lease_ms: int, probe_queue: str | None) -> None:
    set_default_client(create_client(url=url, prefix=prefix))
    worker = await start_worker(StartWorkerOptions(
        app="chaos", url=url, prefix=prefix, registry=registry, concurrency=concurrency, lease_ms=lease_ms,
        grace_period_ms=2000, max_recoveries=1000, blmove_timeout_sec=1.0, reaper_interval_ms=500,
        watchdog_stalled_for_ms=2000,  # a blocking wait is abandoned 3 s after it began (20 s by default)
        queues=registry.queues() + ([probe_queue] if probe_queue else []),
    ))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await worker.stop()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {os.getpid()} %(name)s %(message)s")
    url_arg, prefix_arg, log_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    os.environ["CHAOS_LOG_DIR"] = log_dir
    probe_arg = sys.argv[6] if len(sys.argv) > 6 else None
    asyncio.run(main(url_arg, prefix_arg, int(sys.argv[4]), int(sys.argv[5]), probe_arg))
