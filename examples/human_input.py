"""Human input: a step pauses the run until someone answers with a form.

    python examples/human_input.py

See docs/human-input.md. The run waits in Redis, not on a worker; once answered, only the waiting step runs again.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redflow import (
    InputValidationError,
    RedflowClient,
    StartWorkerOptions,
    WorkflowHandlerContext,
    create_client,
    set_default_client,
    start_worker,
    wait_for_input,
    workflow,
)
from redflow.embedded import EmbeddedServer

APPROVAL = {"type": "object", "required": ["approved", "by"],
            "properties": {"approved": {"type": "boolean"}, "by": {"type": "string"}}}
calls = {"prepare": 0, "approve": 0}


@workflow("expense-approval")
async def expense_approval(ctx: WorkflowHandlerContext[dict[str, Any]]) -> dict[str, Any]:
    async def prepare() -> str:
        calls["prepare"] += 1
        return f"expense of {ctx.input['amount']} EUR"

    async def approve() -> dict[str, Any]:
        calls["approve"] += 1
        if ctx.resume is None:  # no answer yet: pause here
            raise wait_for_input("Approve this expense?", APPROVAL)
        return dict(ctx.resume.form)

    summary = await ctx.step.run("prepare", prepare)
    decision = await ctx.step.run("approve", approve)
    return {"summary": summary, **decision, "attempt": ctx.run.attempt}


async def waiting_for_input(client: RedflowClient, run_id: str) -> str:
    for _ in range(1000):
        for step in await client.get_run_steps(run_id):
            if step.get("kind") == "input" and step["status"] == "running":
                return step["name"]
        await asyncio.sleep(0.01)
    raise RuntimeError(f"run {run_id} never waited for input")


async def main(url: str) -> None:
    client = create_client(url=url)
    set_default_client(client)
    worker = await start_worker(StartWorkerOptions(app="human-input", url=url))
    try:
        handle = await expense_approval.run({"amount": 120})
        step = await waiting_for_input(client, handle.id)
        print("waiting in step:", step, "| status:", (await client.get_run(handle.id) or {})["status"])
        try:
            await client.resume_run(handle.id, form={"approved": "yes"})
        except InputValidationError as exc:
            print("bad form refused:", [(issue["path"], issue["keyword"]) for issue in exc.issues])
        await client.resume_run(handle.id, form={"approved": True, "by": "ana"})
        print("result:", await handle.result(timeout_ms=10_000), "| calls:", calls)
        print("resume after the end:", await client.resume_run(handle.id, form={"approved": False, "by": "x"}))
    finally:
        await worker.stop()
        await client.close()


if __name__ == "__main__":
    with EmbeddedServer() as server:
        asyncio.run(main(server.url))
