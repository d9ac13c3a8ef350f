"""Child workflows: wait for a child's output, start one without waiting, and see a child fail.

    python examples/child_workflows.py

See docs/child-workflows.md. The worker has one slot: a parent waiting for its child gives the slot
up, so the child can run on it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redflow import (
    RedflowError,
    StartWorkerOptions,
    WorkflowHandlerContext,
    create_client,
    set_default_client,
    start_worker,
    workflow,
)
from redflow.embedded import EmbeddedServer


@workflow("square")
async def square(ctx: WorkflowHandlerContext[int]) -> int:
    if ctx.input < 0:
        raise ValueError("negative input")
    return ctx.input * ctx.input


@workflow("audit-log")
async def audit_log(ctx: WorkflowHandlerContext[dict[str, Any]]) -> str:
    return f"logged total {ctx.input['total']}"


@workflow("sum-of-squares")
async def sum_of_squares(ctx: WorkflowHandlerContext[list[int]]) -> dict[str, Any]:
    total = 0
    for i, n in enumerate(ctx.input):
        total += await ctx.step.run_workflow(f"square-{i}", square, n)  # parent waits, slot freed
    audit_id = await ctx.step.emit_workflow("audit", "audit-log", {"total": total})  # fire and forget
    try:
        await ctx.step.run_workflow("square-bad", square, -1)
        failed = "no"
    except RedflowError as exc:  # the child failed: its error message arrives in the parent
        failed = "yes" if "negative input" in str(exc) else "other"
    return {"total": total, "audit_run": audit_id, "child_failed": failed}


async def main(url: str) -> None:
    client = create_client(url=url)
    set_default_client(client)
    worker = await start_worker(StartWorkerOptions(app="children", url=url, concurrency=1))
    try:
        parent = await sum_of_squares.run([1, 2, 3])
        result = await parent.result(timeout_ms=20_000)
        print("total:", result["total"], "| failed child raised in parent:", result["child_failed"])
        audit = client.make_run_handle(result["audit_run"])
        print("audit-log ->", await audit.result(timeout_ms=10_000))
        state = await audit.get_state()
        print("audit run's parent is the parent run:", state is not None and state["parent_run_id"] == parent.id)
        for step in await client.get_run_steps(parent.id):
            print(f"  step {step['seq']}: {step['name']} ({step.get('kind')}, {step['status']})")
    finally:
        await worker.stop()
        await client.close()


if __name__ == "__main__":
    with EmbeddedServer() as server:
        asyncio.run(main(server.url))
