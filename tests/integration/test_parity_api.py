"""The public API a redflow 0.1.x user relies on (issue 11, "Missing or different public API").

Written from the 0.1.1 README and the 0.1.9 behaviour notes (§1): names, signatures and the shapes of
the records queries return, each checked against a real server.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import redflow
from redflow import (
    ConfigurationError,
    CronTrigger,
    EventTrigger,
    InputValidationError,
    RedflowClient,
    StartWorkerOptions,
    WorkflowHandlerContext,
    WorkflowRegistry,
    create_client,
    define_workflow,
    wait_for_input,
)
from redflow.errors import RateLimitExceededError, RetryAfterError, serialize_error

from ..conftest import wait_until

ORDER_SCHEMA = {
    "type": "object",
    "properties": {"order_id": {"type": "string"}},
    "required": ["order_id"],
}


async def _noop(ctx: WorkflowHandlerContext) -> Any:
    return ctx.input


# --- sync_registry ----------------------------------------------------------------------------------
async def test_sync_registry_registers_metadata_triggers_and_contracts_without_a_worker(
    client: RedflowClient, registry: WorkflowRegistry, redis_url: str, prefix: str
) -> None:
    define_workflow(
        "parity-sync", handler=_noop, queue="ops", input_schema=ORDER_SCHEMA, registry=registry,
        cron=[CronTrigger(expression="*/5 * * * *", timezone="UTC", id="parity-every-5")],
        event=[EventTrigger(name="order.created")],
    )
    before_ms = int(time.time() * 1000)
    assert await client.sync_registry(registry) is None

    meta = await client.get_workflow_meta("parity-sync")
    assert meta is not None
    assert meta["name"] == "parity-sync" and meta["queue"] == "ops"
    assert meta["input_json_schema"] == ORDER_SCHEMA
    assert meta["stream_enabled"] is False
    assert isinstance(meta["updated_at"], int) and meta["updated_at"] >= before_ms - 1000
    assert meta["event"] == [{"name": "order.created", "id": None}]
    [cron] = meta["cron"]
    assert cron["id"] == "parity-every-5" and cron["expression"] == "*/5 * * * *"
    # the next slot of */5 is in the future and at most five minutes away
    assert before_ms < cron["next_run_at"] <= before_ms + 5 * 60_000 + 1000
    assert cron["next_run_at"] % 300_000 == 0
    assert [m["name"] for m in await client.list_workflows_meta()] == ["parity-sync"]
    assert [c["id"] for c in await client.list_cron_triggers()] == ["parity-every-5"]
    [definition] = await client.list_event_definitions()
    assert definition["event"] == "order.created"
    assert [s["workflow"] for s in definition["subscribers"]] == ["parity-sync"]

    # The event contract is live: a bad payload is refused at emit, a good one fans out.
    with pytest.raises(InputValidationError):
        await client.emit_event("order.created", {"order_id": 7})
    handles = await client.emit_event("order.created", {"order_id": "o-1"})
    assert len(handles) == 1

    # A client without the definition enqueues by the registered metadata.
    other = create_client(url=redis_url, prefix=prefix)
    other.registry = WorkflowRegistry()
    try:
        handle = await other.run_by_name("parity-sync", {"order_id": "o-2"})
        state = await other.get_run(handle.id)
        assert state is not None and state["queue"] == "ops"
    finally:
        await other.close()


async def test_sync_registry_defaults_to_the_clients_registry_and_refuses_a_conflicting_contract(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    define_workflow("parity-sub-a", handler=_noop, input_schema=ORDER_SCHEMA, registry=registry,
                    event=[EventTrigger(name="order.paid")])
    await client.sync_registry()  # the client's registry
    assert await client.get_workflow_meta("parity-sub-a") is not None

    other = WorkflowRegistry()
    define_workflow("parity-sub-b", handler=_noop, registry=other,
                    input_schema={"type": "object", "properties": {"n": {"type": "integer"}}},
                    event=[EventTrigger(name="order.paid")])
    with pytest.raises(ValueError, match=r"order\.paid"):
        await client.sync_registry(other)
    # a refused build writes nothing: no metadata, no subscription
    assert await client.get_workflow_meta("parity-sub-b") is None
    [definition] = await client.list_event_definitions()
    assert [s["workflow"] for s in definition["subscribers"]] == ["parity-sub-a"]


async def test_the_worker_registers_through_the_client(
    client: RedflowClient, registry: WorkflowRegistry, make_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    define_workflow("parity-via-worker", handler=_noop, registry=registry)
    calls: list[Any] = []
    original = RedflowClient.sync_registry

    async def spy(self: RedflowClient, reg: WorkflowRegistry | None = None, **kwargs: Any) -> None:
        calls.append(reg)
        await original(self, reg, **kwargs)

    monkeypatch.setattr(RedflowClient, "sync_registry", spy)
    await make_worker()
    assert calls == [registry]
    meta = await client.get_workflow_meta("parity-via-worker")
    assert meta is not None and meta["app"] == "test"


# --- StepState wait / wait_until_at -------------------------------------------------------------------
async def test_pending_and_resolved_waits_are_visible_in_get_run_steps(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def approve(ctx: WorkflowHandlerContext) -> Any:
        if ctx.resume is None:
            raise wait_for_input("Ship it?", ORDER_SCHEMA)
        return ctx.resume.form

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        paid = await ctx.step.wait_for_event("paid", "parity.paid", ctx.input["key"], "1h")
        missed = await ctx.step.wait_for_event("late", "parity.never", ctx.input["key"], "200ms")
        form = await ctx.step.run("approve", approve, ctx)
        return {"paid": paid is not None, "missed": missed is None, "form": form}

    wf = define_workflow("parity-waits", handler=handler, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, {"key": "k-1"})

    async def step_named(name: str) -> dict[str, Any] | None:
        for step in await client.get_run_steps(handle.id):
            if step["name"] == name:
                return dict(step)
        return None

    pending = await wait_until(lambda: step_named("paid"), what="the event wait")
    assert pending["status"] == "running"
    assert pending["wait"] == {
        "kind": "event", "event": "parity.paid", "correlation_key": "k-1", "event_id": None,
        "resolved_by": None, "ts": None,
    }
    assert pending["wait_until_at"] > int(time.time() * 1000) + 3_000_000  # about an hour from now

    emitted = await client.emit_event_detailed("parity.paid", {"ok": True}, correlation_key="k-1")
    waiting_input = await wait_until(lambda: step_named("approve"), what="the input wait")
    assert waiting_input["status"] == "running"
    assert waiting_input["wait"] == {
        "kind": "input", "message": "Ship it?", "input_json_schema": ORDER_SCHEMA, "resolved_by": None,
    }
    paid = await step_named("paid")
    assert paid is not None and paid["status"] == "succeeded"
    assert paid["wait"]["resolved_by"] == "event"
    assert paid["wait"]["event_id"] == emitted["event_id"]
    assert paid["wait"]["event"] == "parity.paid" and paid["wait"]["correlation_key"] == "k-1"
    assert isinstance(paid["wait"]["ts"], int)
    late = await step_named("late")
    assert late is not None and late["wait"]["resolved_by"] == "timeout"
    assert late["wait"]["event"] == "parity.never" and late["wait"]["event_id"] is None
    assert isinstance(late["wait_until_at"], int)

    assert await client.resume_run(handle.id, None, form={"order_id": "o-9"}) is not None
    assert await handle.result(timeout_ms=10_000) == {"paid": True, "missed": True, "form": {"order_id": "o-9"}}
    approved = await step_named("approve")
    assert approved is not None and approved["status"] == "succeeded"
    # the step that raised wait_for_input ran again and succeeded; its input wait is its history
    attempts = await client.get_run_attempts(handle.id)
    assert attempts and attempts[-1]["status"] == "succeeded"


async def test_a_sleep_step_reports_wait_until_at(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def handler(ctx: WorkflowHandlerContext) -> str:
        await ctx.step.wait_for("nap", "1h")
        return "woke"

    wf = define_workflow("parity-nap", handler=handler, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    steps = await wait_until(lambda: client.get_run_steps(handle.id), what="the sleep")
    [nap] = steps
    assert nap["status"] == "running" and nap["wait_until_at"] > int(time.time() * 1000)
    assert "wait" not in nap  # a sleep is no event or input wait


# --- RunState ------------------------------------------------------------------------------------------
RUN_STATE_FIELDS = {
    "id", "workflow", "queue", "status", "input", "output", "error", "attempt", "max_attempts", "created_at",
    "available_at", "started_at", "finished_at", "cancel_requested_at", "cancel_reason", "parent_run_id",
    "stream_enabled",
}


async def test_run_state_has_every_field_of_0_1_9(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def sleeper(ctx: WorkflowHandlerContext) -> None:
        await ctx.step.wait_for("long", "1h")

    async def streamer(ctx: WorkflowHandlerContext) -> str:
        assert ctx.stream is not None
        await ctx.stream.write("hi")
        return "done"

    slow = define_workflow("parity-slow", handler=sleeper, registry=registry)
    streaming = define_workflow("parity-streaming", handler=streamer, stream=True, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(slow, {"a": 1})
    state = await client.get_run(handle.id)
    assert state is not None and set(state) == RUN_STATE_FIELDS
    assert state["cancel_requested_at"] is None and state["cancel_reason"] is None
    assert state["stream_enabled"] is False
    await wait_until(lambda: client.get_run_steps(handle.id), what="the sleep")
    before_ms = int(time.time() * 1000)
    assert await client.cancel_run(handle.id, reason="no longer needed")
    canceled = await client.get_run(handle.id)
    assert canceled is not None and canceled["status"] == "canceled"
    assert canceled["cancel_reason"] == "no longer needed"
    assert isinstance(canceled["cancel_requested_at"], int)
    assert canceled["cancel_requested_at"] >= before_ms - 1000

    streamed = await client.enqueue_definition(streaming, None)
    assert await streamed.result(timeout_ms=10_000) == "done"
    state = await client.get_run(streamed.id)
    assert state is not None and set(state) == RUN_STATE_FIELDS and state["stream_enabled"] is True



async def test_stream_enabled_is_known_to_a_client_without_the_definition(
    client: RedflowClient, registry: WorkflowRegistry, make_worker, redis_url: str, prefix: str
) -> None:
    async def streamer(ctx: WorkflowHandlerContext) -> str:
        return "ok"

    wf = define_workflow("parity-stream-remote", handler=streamer, stream=True, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    await handle.result(timeout_ms=10_000)
    other = create_client(url=redis_url, prefix=prefix)
    other.registry = WorkflowRegistry()
    try:
        state = await other.get_run(handle.id)
        assert state is not None and state["stream_enabled"] is True
    finally:
        await other.close()


# --- read_stream(resumable=True) ---------------------------------------------------------------------
async def test_read_stream_resumable_true_reads_from_the_start_with_cursors(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def handler(ctx: WorkflowHandlerContext) -> str:
        assert ctx.stream is not None
        for i in range(4):
            await ctx.stream.write(i)
        return "done"

    wf = define_workflow("parity-resumable", handler=handler, stream=True, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    assert await handle.result(timeout_ms=10_000) == "done"
    reader = await client.read_stream(handle.id, resumable=True, block_ms=200)
    assert reader is not None
    chunks = [c async for c in reader]
    assert [c.record["value"] for c in chunks] == [0, 1, 2, 3]
    assert all(isinstance(c.cursor_id, str) and c.cursor_id for c in chunks)
    # beside it, the cursor form continues after a chunk
    rest = await client.read_stream(handle.id, resumable=chunks[1].cursor_id, block_ms=200)
    assert rest is not None and [c.record["value"] async for c in rest] == [2, 3]
    plain = await client.read_stream(handle.id, resumable=False, drain=True)
    assert plain is not None and len([c async for c in plain]) == 4
    with pytest.raises(ConfigurationError):
        await client.read_stream(handle.id, resumable=5)  # type: ignore[arg-type]


# --- reset_state / reset_runs -----------------------------------------------------------------------------
async def test_reset_state_and_reset_runs_return_deleted_counts(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    wf = define_workflow("parity-reset", handler=_noop, registry=registry)
    await client.sync_registry(registry)
    await client.enqueue_definition(wf, {"n": 1})
    runs = await client.reset_runs()
    assert set(runs) == {"deleted"} and runs["deleted"] > 0
    assert await client.get_workflow_meta("parity-reset") is not None
    state = await client.reset_state()
    assert set(state) == {"deleted"} and state["deleted"] > 0
    assert await client.get_workflow_meta("parity-reset") is None
    assert await client.reset_state() == {"deleted": 0}


# --- StartWorkerOptions(queues=[]) ------------------------------------------------------------------------
async def test_a_worker_with_no_queues_registers_but_runs_nothing(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    wf = define_workflow("parity-no-queues", handler=_noop, registry=registry)
    idle = await make_worker(queues=[])
    assert idle.queues == []
    assert await client.get_workflow_meta("parity-no-queues") is not None  # it registered its registry
    handle = await client.enqueue_definition(wf, {"n": 1})
    await asyncio.sleep(0.3)
    state = await client.get_run(handle.id)
    assert state is not None and state["status"] == "queued"  # nobody polls "default"
    await make_worker()  # the default: every queue of the registry
    assert await handle.result(timeout_ms=10_000) == {"n": 1}
    assert StartWorkerOptions(app="x", queues=[]).queues == []


# --- errors -------------------------------------------------------------------------------------------
def test_serialize_error_returns_the_error_dict() -> None:
    try:
        raise RetryAfterError("slow down", "2s")
    except RetryAfterError as exc:
        record = serialize_error(exc)
    assert record["name"] == "RetryAfterError" and record["message"] == "slow down"
    assert record["kind"] == "retry_after" and record["retryAfterMs"] == 2000
    assert "Traceback" in record["stack"] and "slow down" in record["stack"]
    plain = serialize_error(ValueError("bad"))
    assert plain["name"] == "ValueError" and plain["kind"] == "error" and "retryAfterMs" not in plain
    assert serialize_error(redflow.NonRetriableError("no"))["kind"] == "non_retriable"


def test_rate_limit_exceeded_error_accepts_ms_durations_and_datetimes() -> None:
    assert RateLimitExceededError("limited", 1500).retry_after_ms == 1500
    assert RateLimitExceededError("limited", "2m").retry_after_ms == 120_000
    soon = datetime.now(UTC) + timedelta(seconds=30)
    ms = RateLimitExceededError("limited", soon).retry_after_ms
    assert 28_000 < ms <= 30_000
    past = datetime.now(UTC) - timedelta(seconds=30)
    assert RateLimitExceededError("limited", past).retry_after_ms == 0
    error = RateLimitExceededError("limited", "5s")
    assert error.kind == "rate_limited"
    record = serialize_error(error)
    assert record["kind"] == "rate_limited" and record["retryAfterMs"] == 5000
    assert RateLimitExceededError("limited").retry_after_ms == 0


# --- exports ------------------------------------------------------------------------------------------
ROOT_NAMES_0_1_9 = """
AttemptTrace CanceledError CronTrigger DefineWorkflowOptions EventDelivery EventRecord EventTrigger
InlineRunResult InlineStepResult InputValidationError InputWaitInfo ListEventsParams ListRunsParams
ListedEvent ListedRun NonRetriableError OnFailureContext OutputSerializationError RedflowClient
RedflowError RunHandle RunState RunStats RunStatus RunStreamChunk RunStreamReader RunStreamRecord
SearchRunsParams SearchRunsResult StartWorkerOptions StepState StepTrace TimeoutError UnknownWorkflowError
WaitForInputError WaitInfo WorkerHandle WorkflowDefinition WorkflowHandlerContext WorkflowResumeContext
WorkflowMeta WorkflowRegistry WorkflowStreamWriter __unstable_reset_default_registry_for_tests
create_client default_prefix define_workflow get_default_client get_default_registry is_terminal_status
run_inline set_default_client start_worker validate_input_with_schema wait_for_input workflow
""".split()


def test_every_0_1_9_root_name_is_exported() -> None:
    missing = [n for n in ROOT_NAMES_0_1_9 if not hasattr(redflow, n)]
    assert missing == []
    assert [n for n in ROOT_NAMES_0_1_9 if n not in redflow.__all__] == []
    from redflow.types import (  # noqa: F401  public-ish names of types.py
        ReceivedEvent,
        RetryPolicyContext,
        RunContext,
        WorkflowDebounceOptions,
        WorkflowRateLimitOptions,
        WorkflowRetryPolicy,
    )


def test_redflow_worker_exports_the_worker_api() -> None:
    from redflow.worker import StartWorkerOptions as Options
    from redflow.worker import WorkerHandle, start_worker

    assert Options is redflow.StartWorkerOptions
    assert WorkerHandle is redflow.WorkerHandle
    assert start_worker is redflow.start_worker


def test_registry_list_clear_and_the_default_registry_reset() -> None:
    reg = WorkflowRegistry()
    a = define_workflow("parity-list-b", handler=_noop, registry=reg)
    b = define_workflow("parity-list-a", handler=_noop, registry=reg)
    assert reg.list() == [b, a]  # by name
    reg.clear()
    assert reg.list() == [] and len(reg) == 0 and "parity-list-a" not in reg

    before = redflow.get_default_registry()
    define_workflow("parity-default-reg", handler=_noop)
    assert "parity-default-reg" in redflow.get_default_registry()
    redflow.__unstable_reset_default_registry_for_tests()
    try:
        assert "parity-default-reg" not in redflow.get_default_registry()
    finally:
        before.clear()


def test_validate_input_with_schema() -> None:
    from redflow import validate_input_with_schema

    assert validate_input_with_schema(ORDER_SCHEMA, {"order_id": "o-1"}) == {"order_id": "o-1"}
    assert validate_input_with_schema(None, {"anything": 1}) == {"anything": 1}
    with pytest.raises(InputValidationError) as info:
        validate_input_with_schema(ORDER_SCHEMA, {"order_id": 1})
    assert info.value.issues
    pydantic = pytest.importorskip("pydantic")

    class Order(pydantic.BaseModel):
        order_id: str

    model = validate_input_with_schema(Order, {"order_id": "o-2"})
    assert isinstance(model, Order) and model.order_id == "o-2"
    with pytest.raises(InputValidationError):
        validate_input_with_schema(Order, {})


async def test_typed_records_match_what_queries_return(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    """EventRecord / ListedEvent / EventDelivery / WorkflowMeta name the keys the queries return."""
    define_workflow("parity-typed", handler=_noop, registry=registry, event=[EventTrigger(name="parity.typed")])
    await make_worker()
    result = await client.emit_event_detailed("parity.typed", {"x": 1})
    await asyncio.gather(*(h.result(timeout_ms=10_000) for h in result["handles"]))
    record = await client.get_event(result["event_id"])
    assert record is not None
    assert set(redflow.ListedEvent.__annotations__) <= set(record)
    assert set(redflow.EventRecord.__annotations__) <= set(record)
    [delivery] = record["deliveries"]
    assert set(redflow.EventDelivery.__annotations__) <= set(delivery)
    listed = await client.list_events()
    assert listed and set(redflow.ListedEvent.__annotations__) <= set(listed[0])
    meta = await client.get_workflow_meta("parity-typed")
    assert meta is not None and set(redflow.WorkflowMeta.__annotations__) <= set(meta)
