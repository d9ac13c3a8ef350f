"""input_schema: pydantic, JSON Schema and msgspec, validated before anything is written."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from pydantic import BaseModel

from redflow import (
    InputValidationError,
    RedflowClient,
    RunFailedError,
    WorkflowHandlerContext,
    WorkflowRegistry,
    create_client,
    define_workflow,
    set_default_client,
)
from redflow.errors import ConfigurationError


class SendWelcome(BaseModel):
    user_id: str
    retries: int = 0


class Point(msgspec.Struct):
    x: int
    y: int


async def _keys(client: RedflowClient) -> list[bytes]:
    """Keys under the prefix, without queue bells: a bell token comes and goes as workers wake (a
    worker blocked on it pops it at any moment), so it says nothing about what a call wrote."""
    keys = await client.redis.execute("KEYS", f"{client.prefix}:*")
    return sorted(k for k in keys if not k.endswith(b":bell"))


async def test_pydantic_schema_through_run_and_bad_input_writes_nothing(
    redis_url: str, prefix: str, registry: WorkflowRegistry, make_worker
) -> None:
    seen: list[Any] = []

    async def handler(ctx: WorkflowHandlerContext[SendWelcome]) -> dict:
        seen.append(ctx.input)
        return {"user": ctx.input.user_id, "retries": ctx.input.retries}

    wf = define_workflow("pydantic-wf", handler=handler, input_schema=SendWelcome, registry=registry)
    client = create_client(url=redis_url, prefix=prefix)
    client.registry = registry
    set_default_client(client)
    try:
        await make_worker()
        handle = await wf.run({"user_id": "u1"})  # the reference raised TypeError here
        assert await handle.result(timeout_ms=10_000) == {"user": "u1", "retries": 0}
        assert isinstance(seen[0], SendWelcome)
        handle2 = await wf.run(SendWelcome(user_id="u2", retries=2))  # a model instance works too
        assert await handle2.result(timeout_ms=10_000) == {"user": "u2", "retries": 2}
        before = await _keys(client)
        with pytest.raises(InputValidationError) as info:
            await wf.run({"retries": "many"})
        assert {i["path"] for i in info.value.issues} == {"user_id", "retries"}
        assert "pydantic-wf" in str(info.value)
        assert await _keys(client) == before
        meta = await client.get_workflow_meta("pydantic-wf")
        assert meta is not None and meta["input_json_schema"]["properties"]["user_id"]["type"] == "string"
    finally:
        set_default_client(None)
        await client.close()


async def test_json_schema_with_formats_and_msgspec_struct(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def echo(ctx: WorkflowHandlerContext) -> Any:
        return ctx.input if not isinstance(ctx.input, Point) else {"sum": ctx.input.x + ctx.input.y}

    schema = {"type": "object", "properties": {"email": {"type": "string", "format": "email"}},
              "required": ["email"]}
    wf = define_workflow("json-schema-wf", handler=echo, input_schema=schema, registry=registry)
    wf2 = define_workflow("struct-wf", handler=echo, input_schema=Point, registry=registry)
    await make_worker()
    assert await (await client.enqueue_definition(wf, {"email": "a@b.co"})).result(timeout_ms=10_000) == {
        "email": "a@b.co"
    }
    with pytest.raises(InputValidationError, match="is not a 'email'"):
        await client.enqueue_definition(wf, {"email": "not-an-email"})
    assert await (await client.enqueue_definition(wf2, {"x": 1, "y": 2})).result(timeout_ms=10_000) == {"sum": 3}
    with pytest.raises(InputValidationError, match="Expected `int`"):
        await client.enqueue_definition(wf2, {"x": "one", "y": 2})
    with pytest.raises(ConfigurationError, match="not a valid JSON Schema"):
        define_workflow("bad-schema", handler=echo, input_schema={"type": 12}, registry=WorkflowRegistry())


async def test_worker_validates_input_from_clients_without_the_definition(
    redis_url: str, prefix: str, registry: WorkflowRegistry, make_worker
) -> None:
    async def handler(ctx: WorkflowHandlerContext[SendWelcome]) -> str:
        return ctx.input.user_id

    hooks: list[str] = []

    async def on_failure(ctx: Any) -> None:
        hooks.append(ctx.error.kind)

    define_workflow("remote-validated", handler=handler, input_schema=SendWelcome, on_failure=on_failure,
                    registry=registry)
    await make_worker()
    outsider = create_client(url=redis_url, prefix=prefix)
    outsider.registry = WorkflowRegistry()
    try:
        handle = await outsider.run_by_name("remote-validated", {"wrong": True})
        with pytest.raises(RunFailedError) as info:
            await handle.result(timeout_ms=10_000)
        assert info.value.error["kind"] == "validation"
        state = await outsider.get_run(handle.id)
        assert state is not None and state["attempt"] == 1  # not retried
    finally:
        await outsider.close()
