"""OpenTelemetry tracing (issue 13 item 3), exported to memory: a run continues the trace of the code
that started it across a durable sleep, steps are spans of their execution, a child's spans join
its parent's trace, and REDFLOW_TRACING=0 records nothing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from redflow import RedflowClient, WorkflowHandlerContext, WorkflowRegistry, define_workflow
from redflow.observability import tracing

from ..conftest import wait_until

pytest.importorskip("opentelemetry.sdk")


@pytest.fixture(scope="module")
def exporter() -> Iterator[Any]:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    trace.set_tracer_provider(provider)  # the application's global provider; redflow uses it
    tracing.reset()
    yield memory
    provider.shutdown()  # later tests' spans are dropped, not kept in memory


def _spans_of(exporter: Any, run_id: str) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if (s.attributes or {}).get("redflow.run_id") == run_id]


async def test_a_run_continues_its_callers_trace_across_a_sleep(
    client: RedflowClient, registry: WorkflowRegistry, make_worker, exporter: Any
) -> None:
    from opentelemetry import trace

    async def handler(ctx: WorkflowHandlerContext) -> str:
        a = await ctx.step.run("a", lambda: "A")
        await ctx.step.wait_for("nap", 50)
        return a + await ctx.step.run("b", lambda: "B")

    wf = define_workflow("trace-sleep", handler=handler, registry=registry)
    await make_worker()
    with trace.get_tracer("test").start_as_current_span("checkout") as caller:
        handle = await client.enqueue_definition(wf, None)
    assert await handle.result(timeout_ms=10_000) == "AB"
    spans = await wait_until(lambda: _complete(exporter, handle.id, 5), what="the run's spans")
    by_name: dict[str, list[Any]] = {}
    for s in spans:
        by_name.setdefault(s.name, []).append(s)
    (send,) = by_name["send default"]
    processes = by_name["process default"]
    assert len(processes) == 2  # the execution before the sleep and the one after it
    trace_id = caller.get_span_context().trace_id
    assert {s.context.trace_id for s in spans} == {trace_id}
    assert send.parent.span_id == caller.get_span_context().span_id
    assert all(p.parent.span_id == send.context.span_id for p in processes)
    (step_a,), (step_b,) = by_name["step a"], by_name["step b"]
    assert step_a.parent.span_id == processes[0].context.span_id
    assert step_b.parent.span_id == processes[1].context.span_id
    assert [e.name for e in processes[0].events] == ["suspend"]
    assert processes[0].events[0].attributes["redflow.wait.kind"] == "sleep"
    attrs = processes[1].attributes
    assert attrs["messaging.system"] == "redflow" and attrs["messaging.operation.type"] == "process"
    assert attrs["messaging.destination.name"] == "default" and attrs["redflow.workflow"] == "trace-sleep"
    assert attrs["redflow.attempt"] == 1 and attrs["redflow.outcome"] == "succeeded"
    assert step_b.attributes["redflow.step"] == "b"


async def _complete(exporter: Any, run_id: str, n: int) -> list[Any] | None:
    spans = _spans_of(exporter, run_id)
    return spans if len(spans) >= n else None


async def test_a_child_runs_spans_join_its_parents_trace(
    client: RedflowClient, registry: WorkflowRegistry, make_worker, exporter: Any
) -> None:
    async def child(ctx: WorkflowHandlerContext) -> int:
        return int(ctx.input) * 2

    child_wf = define_workflow("trace-child", handler=child, registry=registry)

    async def parent(ctx: WorkflowHandlerContext) -> int:
        return int(await ctx.step.run_workflow("double", child_wf, 21))

    parent_wf = define_workflow("trace-parent", handler=parent, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(parent_wf, None)
    assert await handle.result(timeout_ms=10_000) == 42
    parent_spans = await wait_until(lambda: _complete(exporter, handle.id, 3), what="the parent's spans")
    child_id = next(s.attributes["redflow.run_id"] for s in exporter.get_finished_spans()
                    if s.name == "process default" and s.attributes.get("redflow.workflow") == "trace-child"
                    and s.context.trace_id == parent_spans[0].context.trace_id)
    child_spans = await wait_until(lambda: _complete(exporter, child_id, 2), what="the child's spans")
    assert {s.context.trace_id for s in child_spans} == {parent_spans[0].context.trace_id}
    (child_send,) = [s for s in child_spans if s.name == "send default"]
    parent_ids = {s.context.span_id for s in parent_spans}
    assert child_send.parent.span_id in parent_ids  # started inside one of the parent's spans


async def test_tracing_off_records_nothing_and_stores_no_context(
    client: RedflowClient, registry: WorkflowRegistry, make_worker, exporter: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry import trace

    monkeypatch.setenv("REDFLOW_TRACING", "0")
    tracing.reset()
    try:
        async def handler(ctx: WorkflowHandlerContext) -> int:
            return await ctx.step.run("one", lambda: 1)

        wf = define_workflow("trace-off", handler=handler, registry=registry)
        await make_worker()
        with trace.get_tracer("test").start_as_current_span("caller"):
            handle = await client.enqueue_definition(wf, None)
        assert await handle.result(timeout_ms=10_000) == 1
        header = await client.store.read_header(handle.id)
        assert header is not None and header.trace_context is None
        assert _spans_of(exporter, handle.id) == []
    finally:
        monkeypatch.delenv("REDFLOW_TRACING")
        tracing.reset()
