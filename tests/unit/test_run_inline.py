"""run_inline: handler logic without Redis."""

from __future__ import annotations

from typing import Any

from redflow import RedflowError, WorkflowHandlerContext, WorkflowRegistry, define_workflow, run_inline


async def fetch(user_id: str) -> dict[str, Any]:
    return {"id": user_id, "email": f"{user_id}@real.example", "tags": ("a", "b")}


async def send(email: str, *, signal: Any = None) -> dict[str, Any]:
    return {"ok": True, "to": email}


async def handler(ctx: WorkflowHandlerContext) -> dict[str, Any]:
    user = await ctx.step.run("fetch-user", fetch, ctx.input["user_id"])
    receipt = await ctx.step.run("send-email", send, user["email"])
    return {"sent": receipt["ok"], "to": receipt["to"], "tags": user["tags"]}


wf = define_workflow("inline", handler=handler, registry=WorkflowRegistry())


async def test_run_inline_executes_steps_through_json() -> None:
    result = await run_inline(wf, input={"user_id": "u1"})
    assert result.succeeded
    assert result.output == {"sent": True, "to": "u1@real.example", "tags": ["a", "b"]}
    assert [(s.name, s.status) for s in result.steps] == [("fetch-user", "succeeded"), ("send-email", "succeeded")]


async def test_run_inline_step_overrides() -> None:
    result = await run_inline(
        wf,
        input={"user_id": "u1"},
        step_overrides={"fetch-user": {"id": "u1", "email": "mock@example.com", "tags": []}},
    )
    assert result.output == {"sent": True, "to": "mock@example.com", "tags": []}
    assert {s.name: s.status for s in result.steps} == {"send-email": "succeeded", "fetch-user": "overridden"}


async def test_run_inline_captures_errors() -> None:
    async def failing(ctx: WorkflowHandlerContext) -> None:
        await ctx.step.run("once", fetch, "x")
        await ctx.step.run("once", fetch, "x")

    result = await run_inline(define_workflow("inline-fail", handler=failing, registry=WorkflowRegistry()))
    assert not result.succeeded
    assert isinstance(result.error, RedflowError)
    assert "duplicate step name 'once'" in str(result.error)
