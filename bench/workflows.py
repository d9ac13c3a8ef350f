"""The workflows the redflow scenarios run, in a registry of their own (shared by client and worker)."""

from __future__ import annotations

from typing import Any

from redflow import WorkflowHandlerContext, WorkflowRegistry, define_workflow

QUEUE = "bench"
registry = WorkflowRegistry()


async def _echo(ctx: WorkflowHandlerContext[Any]) -> Any:
    return ctx.input


async def _identity(x: Any) -> Any:
    return x


async def _three_steps(ctx: WorkflowHandlerContext[Any]) -> Any:
    a = await ctx.step.run("a", _identity, ctx.input)
    b = await ctx.step.run("b", _identity, a)
    return await ctx.step.run("c", _identity, b)


echo = define_workflow("bench-echo", handler=_echo, queue=QUEUE, registry=registry)
three_step = define_workflow("bench-three-step", handler=_three_steps, queue=QUEUE, registry=registry)

WORKFLOWS = {"echo": echo, "three_step": three_step}
