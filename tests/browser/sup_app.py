"""A user module for the supervisor test: one workflow in the default registry."""

from __future__ import annotations

from redflow import WorkflowHandlerContext, workflow


@workflow("dash-hello", queue="default")
async def dash_hello(ctx: WorkflowHandlerContext[object]) -> dict[str, object]:
    return {"hello": ctx.input}
