"""wait_for_input / resume_run: from a step and from the handler, without losing cached steps."""

from __future__ import annotations

from typing import Any

import pytest

from redflow import (
    InputValidationError,
    RedflowClient,
    WorkflowHandlerContext,
    WorkflowRegistry,
    define_workflow,
    wait_for_input,
)

from ..conftest import wait_until

SCHEMA = {"type": "object", "properties": {"approved": {"type": "boolean"}}, "required": ["approved"]}


async def _waiting(client: RedflowClient, run_id: str) -> bool:
    wait = await client.store.read_wait(run_id)
    return bool(wait and wait.kind == "input")


async def test_wait_for_input_raised_from_a_step_reruns_only_that_step(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    calls: dict[str, int] = {"prepare": 0, "approve": 0}

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        async def prepare() -> str:
            calls["prepare"] += 1
            return "draft"

        async def approve() -> bool:
            calls["approve"] += 1
            if ctx.resume is None:
                raise wait_for_input("Approve the draft?", SCHEMA)
            return bool(ctx.resume.form["approved"])

        draft = await ctx.step.run("prepare", prepare)
        ok = await ctx.step.run("approve", approve)
        return {"draft": draft, "approved": ok, "input": ctx.input, "attempt": ctx.run.attempt}

    wf = define_workflow("approval-step", handler=handler, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, {"v": 1})
    await wait_until(lambda: _waiting(client, handle.id), what="waiting for input")
    with pytest.raises(InputValidationError, match="approved"):
        await client.resume_run(handle.id, None, form={"approved": "yes"})
    resumed = await client.resume_run(handle.id, {"v": 2}, form={"approved": True})
    assert resumed is not None and resumed.id == handle.id
    result = await handle.result(timeout_ms=10_000)
    assert result == {"draft": "draft", "approved": True, "input": {"v": 2}, "attempt": 1}
    assert calls == {"prepare": 1, "approve": 2}  # only the waiting step ran again
    assert await client.resume_run(handle.id, None, form={"approved": True}) is None  # finished


async def test_wait_for_input_raised_from_the_handler(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def one() -> int:
        return 1

    body = {"n": 0}

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        async def counted() -> int:
            body["n"] += 1
            return 1

        await ctx.step.run("before", counted)
        if ctx.resume is None:
            raise wait_for_input("What is the answer?")
        await ctx.step.run("after", one)
        return ctx.resume.form

    wf = define_workflow("approval-handler", handler=handler, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    await wait_until(lambda: _waiting(client, handle.id), what="waiting for input")
    state = await client.get_run(handle.id)
    assert state is not None and state["status"] == "scheduled"
    assert await client.resume_run(handle.id, None, form={"answer": 42}) is not None
    assert await handle.result(timeout_ms=10_000) == {"answer": 42}
    assert body["n"] == 1
    assert [s["name"] for s in await client.get_run_steps(handle.id)] == ["before", "after"]
    state = await client.get_run(handle.id)
    assert state is not None and state["attempt"] == 1  # the pause did not consume an attempt
