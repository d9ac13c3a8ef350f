"""A graceful stop that overlaps a claim (found by test_supervisor_kill.py at 20,000 runs).

``Worker.stop()`` used to wait for the runs active when it began only; a claim whose reply arrived
during that wait spawned more runs, which ``stop()`` then interrupted as leftovers as soon as the
first ones were done, grace period or not, and handed back: a step body interrupted so runs again
elsewhere (at-least-once, allowed), but an ``on_failure`` hook interrupted so ran twice for one
failed run, which docs/guarantees.md allows only when a worker dies or loses its lease inside the
hook. The stop now waits for the claim in flight. These tests hold a claim's reply (the server has
applied it) until the stop has begun, as a SIGTERM landing while a claim is in flight does.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from redflow import NonRetriableError, RedflowClient, WorkflowHandlerContext, WorkflowRegistry, define_workflow
from redflow.worker.worker import Worker

from ..conftest import WorkerFactory, wait_until


def _hold_claim_replies(worker: Worker) -> asyncio.Event:
    """From now on, a claim that returns runs keeps its reply until the returned event is set."""
    release = asyncio.Event()
    claim = worker.store.claim

    async def held(*args: Any) -> Any:
        result = await claim(*args)
        if result[2]:
            await release.wait()
        return result

    worker.store.claim = held  # type: ignore[method-assign]
    return release


async def _stop_during_a_claim(worker: Worker, release: asyncio.Event, busy: Any) -> asyncio.Task[None]:
    stopping = asyncio.ensure_future(worker.stop(grace_period_ms=10_000))
    await wait_until(lambda: worker._stopping, timeout_s=5, what="the stop to begin")
    release.set()  # the claim's reply arrives: the stop is already waiting for `busy`
    assert not busy.done()
    return stopping


@pytest.mark.timeout(30)
async def test_a_hook_claimed_while_the_worker_stops_runs_once(
    client: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory,
) -> None:
    hook_calls: list[str] = []

    async def slow(ctx: WorkflowHandlerContext[Any]) -> str:
        await asyncio.sleep(0.5)
        return "done"

    async def doomed(ctx: WorkflowHandlerContext[Any]) -> None:
        raise NonRetriableError("fails at once")

    async def hook(ctx: Any) -> None:
        hook_calls.append(ctx.run.id)
        await asyncio.sleep(1.0)  # longer than the slow run, well inside the grace period

    slow_wf = define_workflow("drain-slow", handler=slow, registry=registry)
    doomed_wf = define_workflow("drain-doomed", handler=doomed, registry=registry, on_failure=hook)
    worker = await make_worker(concurrency=2, lease_ms=1500, blmove_timeout_sec=1.0)
    busy_handle = await client.enqueue_definition(slow_wf, None)
    await wait_until(lambda: worker.active, timeout_s=5, what="the slow run active")
    busy = next(iter(worker.active.values())).task
    release = _hold_claim_replies(worker)
    failed = await client.enqueue_definition(doomed_wf, None)
    await wait_until(lambda: _owned_by(client, worker, failed.id), timeout_s=5, what="the claim applied, reply held")
    stopping = await _stop_during_a_claim(worker, release, busy)
    assert await busy_handle.result(timeout_ms=5000) == "done"
    # The stop either lets the hook finish, or hands the run back before it starts; never both halves.
    await asyncio.wait_for(stopping, 15)
    await make_worker(concurrency=2, lease_ms=1500, blmove_timeout_sec=1.0)  # takes whatever was handed back
    await wait_until(lambda: _hook_done(client, failed.id), timeout_s=10, what="the hook recorded as done")
    assert hook_calls == [failed.id], f"on_failure ran {len(hook_calls)} times"


async def _owned_by(client: RedflowClient, worker: Worker, run_id: str) -> bool:
    return run_id in await client.store.owned_runs(worker.id)


async def _hook_done(client: RedflowClient, run_id: str) -> bool:
    header = await client.store.read_header(run_id)
    return header is not None and header.status == "failed" and not header.hook_pending
