from __future__ import annotations

from redflow import RedflowClient, WorkflowHandlerContext, WorkflowRegistry, define_workflow


async def test_one_step_run_end_to_end(client: RedflowClient, registry: WorkflowRegistry, make_worker) -> None:
    calls = []

    async def double(x: int) -> int:
        calls.append(x)
        return x * 2

    async def handler(ctx: WorkflowHandlerContext) -> dict:
        value = await ctx.step.run("double", double, ctx.input["x"])
        return {"value": value}

    wf = define_workflow("smoke", handler=handler, registry=registry)
    await make_worker(concurrency=4)
    handle = await client.enqueue_definition(wf, {"x": 21})
    assert await handle.result(timeout_ms=10_000) == {"value": 42}
    state = await client.get_run(handle.id)
    assert state is not None and state["status"] == "succeeded" and state["attempt"] == 1
    steps = await client.get_run_steps(handle.id)
    assert [s["name"] for s in steps] == ["double"] and steps[0]["output"] == 42
    assert calls == [21]
