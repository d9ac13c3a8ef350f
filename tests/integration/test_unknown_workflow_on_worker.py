"""A worker that lacks a definition defers the run to one that has it (rolling deploys)."""

from __future__ import annotations

from redflow import RedflowClient, WorkflowHandlerContext, WorkflowRegistry, define_workflow
from redflow.worker import executor

from ..conftest import wait_until


async def test_worker_without_definition_defers_instead_of_failing(
    client: RedflowClient, registry: WorkflowRegistry, make_worker, monkeypatch
) -> None:
    monkeypatch.setattr(executor, "UNKNOWN_WORKFLOW_DEFER_MS", 100)

    async def handler(ctx: WorkflowHandlerContext) -> str:
        return "handled"

    wf = define_workflow("new-in-v2", handler=handler, registry=registry)
    old = await make_worker(registry=WorkflowRegistry(), queues=["default"])
    handle = await client.enqueue_definition(wf, None)
    await wait_until(lambda: _deferred(client, handle.id), what="deferral by the old worker")
    await old.stop()
    await make_worker()  # the new build, with the definition
    assert await handle.result(timeout_ms=10_000) == "handled"
    state = await client.get_run(handle.id)
    assert state is not None and state["attempt"] == 1  # the deferral did not use up an attempt
    assert state["error"] is None  # a succeeded run carries no error from earlier attempts


async def _deferred(client: RedflowClient, run_id: str) -> bool:
    state = await client.get_run(run_id)
    return bool(state and state["status"] == "scheduled" and state["error"]
                and state["error"]["kind"] == "unknown_workflow")
