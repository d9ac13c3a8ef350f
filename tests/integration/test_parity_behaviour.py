"""Behaviour a redflow 0.1.x user relies on (issue 11, "Behaviour to restore"), against a real server.

Each test is written from the 0.1.1 README and the 0.1.9 behaviour notes, not from this package's code.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import uuid4

import msgspec
import pydantic
import pytest

from redflow import (
    EventTrigger,
    InputValidationError,
    OutputSerializationError,
    RedflowClient,
    SearchRunsParams,
    WorkflowHandlerContext,
    WorkflowRegistry,
    WorkflowRetryPolicy,
    define_workflow,
    run_inline,
    wait_for_input,
    workflow,
)
from redflow.errors import ConfigurationError, PayloadEncodingError

from ..conftest import wait_until

FAST = WorkflowRetryPolicy(delay=10)


async def _status(client: RedflowClient, run_id: str) -> str | None:
    state = await client.get_run(run_id)
    return None if state is None else state["status"]


async def _ended(client: RedflowClient, run_id: str, timeout_s: float = 10.0) -> dict[str, Any]:
    await wait_until(lambda: _is_terminal(client, run_id), timeout_s=timeout_s, what=f"run {run_id} ends")
    state = await client.get_run(run_id)
    assert state is not None
    return dict(state)


async def _is_terminal(client: RedflowClient, run_id: str) -> bool:
    return await _status(client, run_id) in ("succeeded", "failed", "canceled")


# --- a step function that returns an awaitable ----------------------------------------------------------


async def test_plain_callable_returning_an_awaitable_is_awaited(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def compute(n: int) -> int:
        await asyncio.sleep(0)
        return n * 2

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        return await ctx.step.run("compute", lambda: compute(5))

    wf = define_workflow("parity-lambda-step", handler=handler, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    assert await handle.result(timeout_ms=10_000) == 10


# --- failed, timed-out and canceled steps in the history -------------------------------------------------


async def test_failed_step_is_recorded_with_its_error_and_runs_again_next_attempt(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    calls: list[int] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("card declined")
        return "charged"

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        return await ctx.step.run("charge", flaky)

    wf = define_workflow("parity-failed-step", handler=handler, retries=FAST, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    assert await handle.result(timeout_ms=10_000) == "charged"
    assert len(calls) == 2  # the failed step ran again in the next attempt

    attempts = await client.get_run_attempts(handle.id)
    assert [a["status"] for a in attempts] == ["failed", "succeeded"]
    first = attempts[0]["steps"]
    assert [(s["name"], s["status"]) for s in first] == [("charge", "failed")]
    assert first[0]["error"] is not None and "card declined" in first[0]["error"]["message"]
    second = attempts[1]["steps"]
    assert [(s["name"], s["status"]) for s in second] == [("charge", "succeeded")]
    steps = await client.get_run_steps(handle.id)
    assert [(s["name"], s["status"], s["output"]) for s in steps] == [("charge", "succeeded", "charged")]


async def test_failed_step_of_a_failed_run_is_visible_in_get_run_steps(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def ok() -> int:
        return 1

    async def boom() -> None:
        raise ValueError("bad row 17")

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        await ctx.step.run("load", ok)
        await ctx.step.run("parse", boom)

    wf = define_workflow("parity-failed-run-steps", handler=handler, max_attempts=1, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    state = await _ended(client, handle.id)
    assert state["status"] == "failed"
    steps = await client.get_run_steps(handle.id)
    assert [(s["name"], s["status"]) for s in steps] == [("load", "succeeded"), ("parse", "failed")]
    assert "bad row 17" in steps[1]["error"]["message"]
    assert steps[0].get("error") is None


async def test_timed_out_step_is_recorded_as_failed_with_a_timeout_error(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def slow() -> None:
        await asyncio.sleep(30)

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        await ctx.step.run("slow", slow, timeout_ms=50)

    wf = define_workflow("parity-timed-out-step", handler=handler, max_attempts=1, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    assert (await _ended(client, handle.id))["status"] == "failed"
    steps = await client.get_run_steps(handle.id)
    assert [(s["name"], s["status"]) for s in steps] == [("slow", "failed")]
    assert steps[0]["error"]["kind"] == "timeout"
    attempts = await client.get_run_attempts(handle.id)
    assert attempts[0]["steps"][0]["error"]["kind"] == "timeout"


async def test_canceled_step_is_recorded_as_canceled(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    started = asyncio.Event()

    async def slow() -> None:
        started.set()
        await asyncio.sleep(30)

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        await ctx.step.run("slow", slow)

    wf = define_workflow("parity-canceled-step", handler=handler, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    await asyncio.wait_for(started.wait(), 10)
    assert await client.cancel_run(handle.id, reason="operator")
    assert (await _ended(client, handle.id))["status"] == "canceled"
    steps = await client.get_run_steps(handle.id)
    assert [(s["name"], s["status"]) for s in steps] == [("slow", "canceled")]
    assert steps[0]["error"] is not None


# --- wait_for(timeout_ms=...) ----------------------------------------------------------------------------


async def test_wait_for_honours_timeout_ms(client: RedflowClient, registry: WorkflowRegistry, make_worker) -> None:
    async def handler(ctx: WorkflowHandlerContext) -> Any:
        await ctx.step.wait_for("long-sleep", "1h", timeout_ms=200)
        return "woke"

    wf = define_workflow("parity-wait-timeout", handler=handler, max_attempts=1, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    state = await _ended(client, handle.id)
    assert state["status"] == "failed"
    assert state["error"]["kind"] == "timeout"
    steps = await client.get_run_steps(handle.id)
    assert [(s["name"], s["status"]) for s in steps] == [("long-sleep", "failed")]


async def test_wait_for_shorter_than_its_timeout_ends_normally(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def handler(ctx: WorkflowHandlerContext) -> Any:
        await ctx.step.wait_for("short-sleep", 100, timeout_ms=5_000)
        return "woke"

    wf = define_workflow("parity-wait-within-timeout", handler=handler, max_attempts=1, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    assert await handle.result(timeout_ms=10_000) == "woke"


# --- mutex keys are global within a prefix ---------------------------------------------------------------


async def test_mutex_key_is_shared_across_workflows_and_queues(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    inside: list[str] = []
    overlaps: list[tuple[str, ...]] = []

    def guarded(label: str) -> Any:
        async def handler(ctx: WorkflowHandlerContext) -> Any:
            inside.append(label)
            if len(inside) > 1:
                overlaps.append(tuple(inside))
            await asyncio.sleep(0.2)
            inside.remove(label)
            return label

        return handler

    mutex = lambda input: f"customer:{input['customer_id']}"  # noqa: E731 (the README's example)
    billing = define_workflow("parity-billing", handler=guarded("billing"), queue="billing", mutex=mutex,
                              registry=registry)
    shipping = define_workflow("parity-shipping", handler=guarded("shipping"), queue="shipping", mutex=mutex,
                               registry=registry)
    await make_worker(concurrency=4)
    handles = [
        await client.enqueue_definition(billing, {"customer_id": "c1"}),
        await client.enqueue_definition(shipping, {"customer_id": "c1"}),
    ]
    assert await asyncio.gather(*(h.result(timeout_ms=10_000) for h in handles)) == ["billing", "shipping"]
    assert overlaps == []


# --- run_inline ------------------------------------------------------------------------------------------


class SignupInput(pydantic.BaseModel):
    user_id: str


async def test_run_inline_validates_input_and_hands_the_model_to_the_handler() -> None:
    registry = WorkflowRegistry()

    @workflow("parity-inline-welcome", input_schema=SignupInput, registry=registry)
    async def send_welcome_email(ctx: WorkflowHandlerContext) -> Any:
        return {"user": ctx.input.user_id, "type": type(ctx.input).__name__}

    result = await run_inline(send_welcome_email, input={"user_id": "test"})
    assert result.succeeded, result.error
    assert result.output == {"user": "test", "type": "SignupInput"}

    bad = await run_inline(send_welcome_email, input={"user": "test"})
    assert isinstance(bad.error, InputValidationError)


async def test_run_inline_non_json_output_raises_output_serialization_error() -> None:
    registry = WorkflowRegistry()

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        return {"tags": {"a", "b"}}

    wf = define_workflow("parity-inline-bad-output", handler=handler, registry=registry)
    result = await run_inline(wf, input=None)
    assert isinstance(result.error, OutputSerializationError)


# --- JSON means JSON -------------------------------------------------------------------------------------


@dataclass
class _Point:
    x: int


class _Custom:
    pass


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({"tags": {"a", "b"}}, "tags"),
        ({"blob": b"\x00\x01"}, "blob"),
        ({"amount": Decimal("1.10")}, "amount"),
        ({"when": datetime.now(UTC)}, "when"),
        ({"ids": [1, uuid4()]}, "ids"),
        ({"obj": _Custom()}, "obj"),
        ({"point": _Point(1)}, "point"),
        ({"ratio": math.nan}, "ratio"),
        ({"limit": [1.0, math.inf]}, "limit"),
    ],
)
async def test_enqueue_refuses_what_json_refuses(
    client: RedflowClient, registry: WorkflowRegistry, value: Any, path: str
) -> None:
    wf = define_workflow("parity-json-input", handler=_noop, registry=registry)
    with pytest.raises(PayloadEncodingError) as info:
        await client.enqueue_definition(wf, value)
    message = str(info.value)
    assert "parity-json-input" in message
    assert path in message
    assert await client.list_runs() == []  # nothing written


async def test_enqueue_accepts_tuples_and_plain_json(client: RedflowClient, registry: WorkflowRegistry,
                                                     make_worker) -> None:
    async def echo(ctx: WorkflowHandlerContext) -> Any:
        return ctx.input

    wf = define_workflow("parity-json-ok", handler=echo, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, {"pair": (1, 2), "f": 1.5, "s": "é", "n": None, "b": True})
    assert await handle.result(timeout_ms=10_000) == {"pair": [1, 2], "f": 1.5, "s": "é", "n": None, "b": True}


async def test_emit_event_refuses_non_json_payload(client: RedflowClient) -> None:
    with pytest.raises(PayloadEncodingError, match="ids"):
        await client.emit_event("parity-event", {"ids": {1, 2}})


@pytest.mark.parametrize("bad", [{1, 2}, math.nan, Decimal("2.5")])
async def test_non_json_output_fails_with_serialization(
    client: RedflowClient, registry: WorkflowRegistry, make_worker, bad: Any
) -> None:
    async def handler(ctx: WorkflowHandlerContext) -> Any:
        return {"value": bad}

    async def step_handler(ctx: WorkflowHandlerContext) -> Any:
        async def produce() -> Any:
            return [bad]

        return await ctx.step.run("produce", produce)

    wf = define_workflow("parity-json-output", handler=handler, registry=registry)
    step_wf = define_workflow("parity-json-step-output", handler=step_handler, registry=registry)
    await make_worker()
    for definition in (wf, step_wf):
        handle = await client.enqueue_definition(definition, None)
        state = await _ended(client, handle.id)
        assert state["status"] == "failed"
        assert state["error"]["kind"] == "serialization"
        assert state["attempt"] == 1  # not retried


async def _noop(ctx: WorkflowHandlerContext) -> None:
    return None


# --- search_runs(query=...) ------------------------------------------------------------------------------


async def test_search_runs_query_is_case_insensitive(client: RedflowClient, registry: WorkflowRegistry) -> None:
    wf = define_workflow("parity-search", handler=_noop, registry=registry)
    handle = await client.enqueue_definition(wf, {"customer": "ACME Corp"})
    await client.enqueue_definition(wf, {"customer": "other"})
    for query in ("acme corp", "ACME CORP", "Acme"):
        found = await client.search_runs(SearchRunsParams(query=query))
        assert [r["id"] for r in found["runs"]] == [handle.id], query
    by_workflow = await client.search_runs(SearchRunsParams(query="PARITY-SEARCH"))
    assert len(by_workflow["runs"]) == 2


# --- wait_for_input with a pydantic model or a msgspec Struct ----------------------------------------------


class Approval(pydantic.BaseModel):
    approved: bool


class ApprovalStruct(msgspec.Struct):
    approved: bool


@pytest.mark.parametrize("schema", [Approval, ApprovalStruct], ids=["pydantic", "msgspec"])
async def test_wait_for_input_accepts_a_model_as_schema(
    client: RedflowClient, registry: WorkflowRegistry, make_worker, schema: Any
) -> None:
    async def handler(ctx: WorkflowHandlerContext) -> Any:
        async def approve() -> bool:
            if ctx.resume is None:
                raise wait_for_input("Approve?", schema)
            return bool(ctx.resume.form["approved"])

        return await ctx.step.run("approve", approve)

    wf = define_workflow(f"parity-input-{schema.__name__}", handler=handler, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    await wait_until(lambda: _waiting_for_input(client, handle.id), what="waiting for input")
    assert await _status(client, handle.id) == "scheduled"
    with pytest.raises(InputValidationError):
        await client.resume_run(handle.id, None, form={"approved": "not a bool"})
    assert await client.resume_run(handle.id, None, form={"approved": True}) is not None
    assert await handle.result(timeout_ms=10_000) is True


async def _waiting_for_input(client: RedflowClient, run_id: str) -> bool:
    wait = await client.store.read_wait(run_id)
    return bool(wait and wait.kind == "input")


# --- event contracts -------------------------------------------------------------------------------------


class OrderPaidA(pydantic.BaseModel):
    order_id: str
    amount: int


class OrderPaidB(pydantic.BaseModel):
    """The same contract, fields declared in another order (and documented differently)."""

    amount: int
    order_id: str


async def test_equivalent_models_are_one_event_contract(registry: WorkflowRegistry, make_worker) -> None:
    define_workflow("parity-paid-a", handler=_noop, input_schema=OrderPaidA, event=[EventTrigger(name="paid2")],
                    registry=registry)
    other = WorkflowRegistry()
    define_workflow("parity-paid-b", handler=_noop, input_schema=OrderPaidB, event=[EventTrigger(name="paid2")],
                    registry=other)
    await make_worker()
    await make_worker(registry=other)  # no "different input schemas"


async def test_enum_and_type_order_do_not_matter_but_a_property_named_title_does(
    registry: WorkflowRegistry, make_worker
) -> None:
    first = {"type": "object", "title": "A", "properties": {"level": {"enum": ["low", "high"]},
                                                            "n": {"type": ["integer", "null"]}}}
    same = {"type": "object", "description": "B", "properties": {"n": {"type": ["null", "integer"]},
                                                                   "level": {"enum": ["high", "low"]}}}
    define_workflow("parity-contract-1", handler=_noop, input_schema=first, event=[EventTrigger(name="lvl")],
                    registry=registry)
    await make_worker()
    second = WorkflowRegistry()
    define_workflow("parity-contract-2", handler=_noop, input_schema=same, event=[EventTrigger(name="lvl")],
                    registry=second)
    await make_worker(registry=second)

    with_title = {"type": "object", "properties": {"title": {"type": "string"}, "body": {"type": "string"}}}
    without = {"type": "object", "properties": {"body": {"type": "string"}}}
    third = WorkflowRegistry()
    define_workflow("parity-doc-1", handler=_noop, input_schema=with_title, event=[EventTrigger(name="doc")],
                    registry=third)
    await make_worker(registry=third)
    fourth = WorkflowRegistry()
    define_workflow("parity-doc-2", handler=_noop, input_schema=without, event=[EventTrigger(name="doc")],
                    registry=fourth)
    with pytest.raises(ConfigurationError, match="different input schemas"):
        await make_worker(registry=fourth)


# --- per-attempt workflow timeout ------------------------------------------------------------------------


async def test_workflow_timeout_fails_the_attempt_and_is_retried(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    attempts: list[int] = []

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        attempts.append(ctx.run.attempt)
        if ctx.run.attempt == 1:
            await asyncio.Event().wait()  # never returns
        return "second time lucky"

    wf = define_workflow("parity-wf-timeout", handler=handler, timeout_ms=200, retries=FAST, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    assert await handle.result(timeout_ms=10_000) == "second time lucky"
    assert attempts == [1, 2]
    traces = await client.get_run_attempts(handle.id)
    assert traces[0]["status"] == "failed" and traces[0]["error"]["kind"] == "timeout"


async def test_workflow_timeout_with_the_decorator_fails_a_hung_run(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    @workflow("parity-wf-timeout-deco", timeout_ms=150, max_attempts=2, retries=FAST, registry=registry)
    async def hung(ctx: WorkflowHandlerContext) -> Any:
        await asyncio.sleep(3600)

    await make_worker()
    handle = await client.enqueue_definition(hung, None)
    state = await _ended(client, handle.id)
    assert state["status"] == "failed"
    assert state["error"]["kind"] == "timeout"
    assert state["attempt"] == 2


async def test_workflow_timeout_must_be_positive() -> None:
    with pytest.raises(ConfigurationError):
        define_workflow("parity-wf-timeout-bad", handler=_noop, timeout_ms=0, registry=WorkflowRegistry())
